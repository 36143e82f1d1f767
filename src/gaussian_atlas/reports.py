"""What the stages (and ``gatlas``) write for people beside their results: pictures, plot tables, the
evaluation gallery's content, and the output files a stage and a ``gatlas`` command share.

Plain functions of tables and folders; heavy imports (matplotlib, torch, pandas, the renderer) stay inside
them, so importing this module costs nothing and needs no DVC, Prefect, MLflow or great-expectations.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["dataset_sheet", "manifest_sheet", "fit_pictures", "write_atlas_tables", "atlas_pictures",
           "stats_pictures", "write_sample", "evaluation_plots", "prompt_scores", "gallery_headline"]


# --- generate / ingest ------------------------------------------------------------------------------------

def dataset_sheet(dataset: str | os.PathLike, limit: int = 32, ncols: int = 8) -> np.ndarray:
    """Contact sheet of the first view of up to ``limit`` objects of a NeRF-layout folder, captioned."""
    from PIL import Image

    from . import io as gio
    from .viz import contact_sheet

    images, labels = [], []
    for t in sorted(Path(dataset).glob("**/transforms.json"))[:limit]:
        meta = gio.read_json(t)
        images.append(np.asarray(Image.open(t.parent / meta["frames"][0]["file_path"]).convert("RGBA")))
        obj = t.parent / "object.json"
        labels.append(gio.read_json(obj).get("caption", t.parent.name) if obj.exists() else t.parent.name)
    return contact_sheet(images, labels, ncols=ncols)


def manifest_sheet(ingested: str | os.PathLike, manifest: Any, limit: int = 32, ncols: int = 8) -> np.ndarray:
    """Contact sheet of the first view of the first ``limit`` objects of an ingest manifest, captioned."""
    from .data import load_object
    from .viz import contact_sheet

    rows = manifest.head(limit)
    images = [(load_object(Path(ingested) / p, views=[0])["rgb"][0] * 255 + 0.5).astype("uint8") for p in rows["path"]]
    return contact_sheet(images, list(rows["caption"]), ncols=ncols)


# --- fit --------------------------------------------------------------------------------------------------

def fit_pictures(table: Any, data: Path, out: Path, manifest: Any, reports: Path, n_side: int = 6) -> list[Path]:
    """Histograms of Gaussian count and PSNR (``histograms.png``); ground truth vs fit for the first ``n_side``
    fitted objects (``fits_vs_gt.png``). ``table``: the fit's per-object metrics; returns the pictures written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from . import io as gio
    from .data import load_object
    from .gaussians import read_ply
    from .render import render
    from .viz import contact_sheet

    data, out, reports = Path(data), Path(out), Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    ok = table[table["status"] == "ok"]
    pics = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist(ok["n_gaussians"], bins=20, color="#4477aa")
    axes[0].set(xlabel="Gaussians per fit", ylabel="objects", title="Gaussian count (paper Fig. 2d)")
    axes[1].hist(ok["psnr"], bins=20, color="#aa7744")
    axes[1].set(xlabel="held-out PSNR (dB)", title="fit quality")
    fig.tight_layout()
    with gio.atomic_path(reports / "histograms.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    pics.append(reports / "histograms.png")

    images, labels = [], []
    paths = dict(zip(manifest["id"], manifest["path"]))
    for _, row in ok.head(n_side).iterrows():
        o = load_object(data / paths[row["id"]], views=[0])
        g = read_ply(out / row["ply"])
        H, W = o["rgb"].shape[1:3]
        pred = render(g, torch.from_numpy(o["c2w"]), torch.from_numpy(o["K"]), W, H).rgb[0].clamp(0, 1)
        images += [(o["rgb"][0] * 255 + 0.5).astype(np.uint8), (pred.numpy() * 255 + 0.5).astype(np.uint8)]
        labels += [f"{row['id']} ground truth", f"fit {row['psnr']:.1f} dB, {row['n_gaussians']} G"]
    if images:
        gio.write_png(reports / "fits_vs_gt.png", contact_sheet(images, labels, ncols=4))
        pics.append(reports / "fits_vs_gt.png")
    return pics


# --- atlas / normalize ------------------------------------------------------------------------------------

INDEX_COLUMNS = ["id", "caption", "path", "shard", "center_x", "center_y", "center_z", "scale", "n_real", "n_input",
                 "split", "coherence", "distance_ratio"]


def write_atlas_tables(out: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                       quarantine: Sequence[Mapping[str, Any]]) -> tuple[Any, Any]:
    """The atlas layout's tables, atomically: ``<out>/index.parquet`` (one row per atlas, by id) and
    ``<out>/quarantine.csv`` (id, reason); ``rows``/``quarantine`` as :func:`gaussian_atlas.atlas.write_atlases`
    returns them. Returns both tables."""
    import pandas as pd

    from . import io as gio

    out = Path(out)
    index = pd.DataFrame(rows).sort_values("id").reset_index(drop=True) if rows else pd.DataFrame(columns=INDEX_COLUMNS)
    gio.write_parquet(out / "index.parquet", index)
    q = pd.DataFrame(quarantine, columns=["id", "reason"])
    gio.write_csv(out / "quarantine.csv", q)
    return index, q


def atlas_pictures(atlas_dir: str | os.PathLike, index: Any, reports: str | os.PathLike, side: int,
                   n: int = 4) -> list[Path]:
    """Channel pictures (paper Fig. 6) of the first ``n`` atlases of ``index``: ``<reports>/channels_<id>.png``."""
    from . import io as gio
    from .atlas import atlas_figure

    pics = []
    for r in index.head(n).itertuples(index=False):
        with np.load(Path(atlas_dir) / r.path) as z:
            fig = atlas_figure(z["atlas"], scale=max(1, 128 // side))
        pics.append(gio.write_png(Path(reports) / f"channels_{r.id}.png", fig))
    return pics


def stats_pictures(stats: Any, reports: str | os.PathLike) -> list[Path]:
    """The pixel-wise mean and std maps of :class:`gaussian_atlas.normalize.RunningStats` as atlas pictures."""
    from . import io as gio
    from .atlas import atlas_figure

    return [gio.write_png(Path(reports) / f"{k}.png", atlas_figure(getattr(stats, k).astype(np.float32), scale=2))
            for k in ("mean", "std")]


# --- evaluate and `gatlas generate` -----------------------------------------------------------------------

def write_sample(g: Any, frames: np.ndarray, atlas: Any, ply: str | os.PathLike, gif: str | os.PathLike,
                 png: str | os.PathLike) -> tuple[Path, Path, Path]:
    """One generated object's files: its Gaussians ``g`` as a PLY (INRIA layout), its turntable ``frames``
    ``[F, H, W, 3]`` as a GIF and its ``atlas`` ``[16, S, S]`` as a channel picture. Returns the three paths."""
    from . import io as gio
    from .atlas import atlas_figure
    from .gaussians import write_ply
    from .sample import write_gif

    return write_ply(ply, g), write_gif(gif, frames), gio.write_png(png, atlas_figure(atlas, scale=2))


def evaluation_plots(reports: str | os.PathLike, rows: Any, metrics: Mapping[str, Any]) -> list[Path]:
    """DVC plot data of the evaluation: ``accuracy.csv`` (accuracy per source, split and metric, and chance:
    bars) and ``per_prompt.csv`` (colour and Chamfer distances per prompt and source: lines)."""
    import pandas as pd

    from . import io as gio

    reports = Path(reports)
    acc = []
    for src in ("generated", "ceiling", "floor"):
        for split in ("seen", "held_out"):
            for metric in ("colour", "shape", "both"):
                v = metrics.get(src, {}).get(split, {}).get(f"{metric}_accuracy")
                if v is not None:
                    acc.append({"label": f"{src} {split.replace('_', '-')} {metric}", "source": src, "split": split,
                                "metric": metric, "accuracy": v})
    for metric, v in metrics["chance"].items():
        acc.append({"label": f"chance {metric}", "source": "chance", "metric": metric, "accuracy": v})
    wide = rows.pivot_table(index="index", columns="source", values=["colour_distance", "chamfer"], aggfunc="mean")
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    cols = [f"{a}_{b}" for a in ("colour_distance", "chamfer") for b in ("generated", "ceiling", "floor")]
    wide = wide.reindex(columns=cols).reset_index()  # every plotted column, empty where a source has no object
    return [gio.write_csv(reports / "accuracy.csv", pd.DataFrame(acc)), gio.write_csv(reports / "per_prompt.csv", wide)]


def _py(v: Any) -> Any:
    """numpy/pandas scalars -> plain Python (None for missing) for the gallery."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def prompt_scores(g: Any, seeds: Sequence[int]) -> dict[str, Any]:
    """One prompt's gallery scores over its samples (``g``: its rows of the generated source): predictions of
    the first sample, accuracies over all."""
    first = g.iloc[0] if len(g) else {}
    out = {"seeds": ", ".join(str(x) for x in seeds)}
    for k in ("colour_pred", "shape_pred"):
        out[f"{k} (first)"] = _py(first.get(k)) if len(g) else None
    for k in ("colour_correct", "shape_correct", "both_correct"):
        v = g[k].dropna()
        out[k] = f"{int(v.sum())}/{len(v)}" if len(v) else None
    if g["clip_score"].notna().any():
        out["clip_score"] = round(float(g["clip_score"].mean()), 3)
    return out


def gallery_headline(m: Mapping[str, Any]) -> dict[str, Any]:
    """The gallery's summary table from the evaluation metrics: settings, accuracies per source and split
    with the 95 % interval of "both", CLIP/VQA status."""
    h = {"prompts": m["n_prompts"], "samples per prompt": m["samples_per_prompt"],
         "held-out singles": m["n_single_held_out"], "views per sample": m["n_views"],
         "DPM-Solver++ steps": m["steps"], "guidance": m["guidance"], "intervals": m["ci"]}

    def acc(b: Mapping[str, Any]) -> str:
        ci = b.get("both_accuracy_ci95")
        return (f"{b['colour_accuracy']} / {b['shape_accuracy']} / {b['both_accuracy']}"
                + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" (n={b['n']}, {b['n_prompts']} prompts)")

    for src in ("generated", "ceiling", "floor"):
        if src in m:
            for split in ("seen", "held_out"):
                if m[src][split]["n"]:
                    h[f"{src}, {split.replace('_', '-')}: colour / shape / both [both 95 % CI]"] = acc(m[src][split])
    for key in ("clip_score", "vqa_score"):
        c = m[key]
        h[key] = (f"generated {c.get('generated')}, ceiling {c.get('ceiling')}, floor {c.get('floor')} ({c.get('model')})"
                  if c["status"] == "ok" else f"skipped: {c['reason']}")
    return h


STAGE_ORDER = ("generate", "ingest", "fit", "prune_check", "atlas", "normalize", "pretrain2d", "train", "evaluate")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.2f}, {v[1]:.2f}]"
    return str(v)


def metrics_summary(metrics_dir: str | os.PathLike = "metrics", full: bool = False) -> str:
    """The stages' ``metrics/*.json`` in a few lines a person reads (``gatlas metrics``).

    Per stage (pipeline order) its top-level numbers; for ``evaluate``, both-right accuracy with its
    95 % interval per source (generated, ceiling, floor) and split (seen, held out). ``full``: every
    key, flattened (what ``dvc metrics show`` prints as one wide table).
    """
    import json

    from .config import flatten

    files = {p.stem: p for p in Path(metrics_dir).glob("*.json")}
    if not files:
        raise FileNotFoundError(f"no metrics in {metrics_dir}: run the pipeline first (make demo / dvc repro)")
    lines = []
    for stage in sorted(files, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s)):
        m = json.loads(files[stage].read_text())
        if full:
            lines += [f"{stage}.{k} = {_short(v)}" for k, v in flatten(m).items()]
            continue
        top = {k: (v if not isinstance(v, str) or len(v) <= 60 else v[:57] + "...") for k, v in m.items()
               if isinstance(v, (int, float, bool, str))}
        lines.append(f"{stage:<12} " + ", ".join(f"{k}={_short(v)}" for k, v in top.items()))
        if stage == "evaluate":
            for src in ("generated", "ceiling", "floor"):
                s = m.get(src)
                if not isinstance(s, dict):
                    continue
                parts = [f"{split}: {_short(s[split]['both_accuracy'])} {_short(s[split].get('both_accuracy_ci95'))}"
                         f" (n={s[split].get('n')})" for split in ("seen", "held_out")
                         if isinstance(s.get(split), dict) and s[split].get("both_accuracy") is not None]
                lines.append(f"{'':<12}   {src:<9} both right  " + ("; ".join(parts) or
                                                                     f"{_short(s.get('both_accuracy'))}"))
    return "\n".join(lines)
