"""DVC stage `fit`: one bounded-count 3D Gaussian splat per ingested object.

    python -m stages.fit --data data/ingested --out data/fits

Reads ``params.yaml: fit``; ``fit.method`` picks the fitter: ``plain`` (free Gaussians,
gsplat densification) or ``anchors`` (the paper's Scaffold-GS-style anchors, baked into
the same PLYs). Objects are fitted in chunks handed to a Prefect task
runner (threads by default, Dask with ``fit.runner: dask``), several objects per
GPU batch (``fit.batch_objects``). Per object: ``<out>/objects/<shard>/<id>.ply``
(INRIA layout) and ``<id>.json`` (metrics), written atomically; finished objects
are skipped on rerun, so a killed run loses only the objects in flight.
Also writes ``<out>/metrics.parquet`` (one row per object), ``metrics/fit.json``,
and pictures in ``reports/fit/``; logs them to MLflow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common import StageError, load_params, main_guard, stage_run

if TYPE_CHECKING:
    from gaussian_atlas.fit import FitConfig

RUNNER_KEYS = ("runner", "workers", "dask_address", "chunk_size", "device")


def fit_config(section: dict) -> tuple["FitConfig", dict]:
    """``params.yaml: fit`` -> (the fit's :class:`FitConfig`, the runner keys). ``method`` picks the
    fitter (``plain`` | ``anchors``, the latter configured by the nested ``anchors:`` section)."""
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.fit import FitConfig

    section = dict(section)
    run = {k: section.pop(k) for k in RUNNER_KEYS if k in section}
    return from_dict(FitConfig, section, "params.yaml: fit", complete=True), run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/ingested", help="ingest output folder (default: %(default)s)")
    ap.add_argument("--out", default="data/fits", help="fit output folder (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/fit.json", help="DVC metrics file (default: %(default)s)")
    ap.add_argument("--reports", default="reports/fit", help="pictures folder (default: %(default)s)")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    args = ap.parse_args(argv)

    import mlflow
    import pandas as pd
    import torch

    from flows.fanout import fan_out
    from gaussian_atlas import io as gio
    from gaussian_atlas.config import to_dict
    from gaussian_atlas.data import load_manifest
    from gaussian_atlas.fit import fit_chunk

    cfg, run = fit_config(load_params("fit", args.params))
    device = run.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # parallel chunks share the cores instead of fighting over them
        import os

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(run.get("workers", 1)))))
    manifest = load_manifest(args.data)
    if not len(manifest):
        raise StageError(f"{args.data}/manifest.parquet has no objects: nothing to fit")
    out = Path(args.out)
    items = manifest[["id", "path", "shard"]].to_dict("records")
    chunk = int(run.get("chunk_size", max(cfg.batch_objects, 8)))
    chunks = [(f"objects {i}-{min(i + chunk, len(items)) - 1}", (items[i:i + chunk], str(args.data), str(out), cfg),
               {"device": device, "progress": False, "report": True}) for i in range(0, len(items), chunk)]

    with stage_run("fit", {**to_dict(cfg), **run, "device": device}):
        t0 = time.perf_counter()
        rows = fan_out(fit_chunk, chunks, runner=run.get("runner", "threads"), workers=int(run.get("workers", 1)),
                       address=run.get("dask_address"), flow_name="fit-objects")
        seconds = time.perf_counter() - t0
        table = pd.DataFrame(rows).sort_values("id").reset_index(drop=True)
        gio.write_parquet(out / "metrics.parquet", table)
        ok = table[table["status"] == "ok"]
        now = table["fitted_now"].fillna(False).astype(bool) if "fitted_now" in table else pd.Series(False, index=table.index)
        metrics = {
            "n_objects": len(table), "n_ok": len(ok), "n_failed": int((table["status"] != "ok").sum()),
            "psnr_mean": float(ok["psnr"].mean()) if len(ok) else float("nan"),
            "psnr_min": float(ok["psnr"].min()) if len(ok) else float("nan"),
            "ssim_mean": float(ok["ssim"].mean()) if len(ok) else float("nan"),
            "n_gaussians_mean": float(ok["n_gaussians"].mean()) if len(ok) else float("nan"),
            "n_gaussians_max": int(ok["n_gaussians"].max()) if len(ok) else 0,
            # this run's wall time and what it fitted; a resumed run reuses finished objects, so its rate is over
            # the objects fitted now, and the fitting time of every object (reused ones too) is summed apart
            "seconds": round(seconds, 2),
            "n_fitted_now": int(now.sum()),
            "objects_per_minute": round(60.0 * int(now.sum()) / max(seconds, 1e-9), 2) if now.any() else None,
            "fit_seconds_all_objects": round(float(ok["seconds"].sum()), 2) if len(ok) else 0.0,
        }
        gio.write_json(args.metrics, metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None and v == v})
        mlflow.log_artifact(str(out / "metrics.parquet"))
        reports = Path(args.reports)
        for pic in fit_pictures(table, Path(args.data), out, manifest, reports):
            mlflow.log_artifact(str(pic))
    print(f"fit ({cfg.method}): {metrics['n_ok']}/{metrics['n_objects']} objects, mean PSNR {metrics['psnr_mean']:.2f} dB, "
          f"mean {metrics['n_gaussians_mean']:.0f} Gaussians, {seconds:.1f} s on {device} -> {out}")


def fit_pictures(table, data: Path, out: Path, manifest, reports: Path, n_side: int = 6) -> list[Path]:
    """Histograms of Gaussian count and PSNR; ground truth vs fit for a few objects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from gaussian_atlas import io as gio
    from gaussian_atlas.data import load_object
    from gaussian_atlas.gaussians import read_ply
    from gaussian_atlas.render import render
    from gaussian_atlas.viz import contact_sheet

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


if __name__ == "__main__":
    main_guard(main)
