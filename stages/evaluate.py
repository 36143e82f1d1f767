"""DVC stage `evaluate`: sample the trained model and score it (paper Sec. 6).

    python -m stages.evaluate --model models/atlas-unet/model --atlas data/atlas --out data/evaluate

Reads ``params.yaml: evaluate``. Prompts: ``evaluate.prompts`` (a text file) or the
built-in benchmark prompts chosen from the training captions (``<atlas>/index.parquet``),
including shape x colour combinations never seen in training. For each prompt: DPM-Solver++
sampling, ``n_views`` random views, procedural colour/shape scores, CLIP and VQA scores when
their weights are on disk (else recorded as skipped with the reason), the same scores for the
ceiling (training atlases with that caption) and the floor (random atlases).

Writes ``<out>/``: ``prompts.jsonl`` (prompt, parts, held-out flag, seed), ``scores.parquet``
and ``scores.csv`` (one row per prompt and source), per prompt ``plys/<i>-<slug>.ply``
(INRIA, unit-ball frame, +Z up), ``turntables/<i>-<slug>.gif``, ``atlases/<i>-<slug>.png``
(channel pictures), ``views.png`` (the evaluation views of every prompt) and
``gallery.html``; ``metrics/evaluate.json``; DVC plot data in ``reports/evaluate/``. MLflow:
the metrics, the turntables, the gallery (with its pictures) and the scores table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.common import load_params, main_guard, stage_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/atlas-unet/model", help="trained model folder (default: %(default)s)")
    ap.add_argument("--atlas", default="data/atlas", help="training atlases: captions + ceiling (default: %(default)s)")
    ap.add_argument("--out", default="data/evaluate", help="output folder (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/evaluate.json", help="DVC metrics file (default: %(default)s)")
    ap.add_argument("--reports", default="reports/evaluate", help="DVC plot data (default: %(default)s)")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    args = ap.parse_args(argv)

    import mlflow
    import numpy as np
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import atlas_figure
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.evaluate import (EvaluateConfig, benchmark_prompts, ceiling_atlases, evaluate, gallery_html,
                                         read_prompts, slug)
    from gaussian_atlas.gaussians import write_ply
    from gaussian_atlas.sample import load_atlas_model, sample_sheet, turntable, write_gif

    cfg = from_dict(EvaluateConfig, load_params("evaluate", args.params), "params.yaml: evaluate")
    atlas_dir = Path(args.atlas)
    index_path = atlas_dir / "index.parquet"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} does not exist: run the atlas stage first")
    index = pd.read_parquet(index_path)
    captions = [str(c) for c in index["caption"].fillna("")]
    specs = (read_prompts(cfg.prompts, captions) if cfg.prompts else
             benchmark_prompts(captions, cfg.n_seen, cfg.n_held_out, cfg.n_compositions, cfg.seed))
    if not specs:
        raise ValueError(f"no evaluation prompts: {index_path} has no generator captions and evaluate.prompts is null")
    model = load_atlas_model(args.model, device=cfg.torch_device())
    ceiling = ceiling_atlases(index, atlas_dir, specs)  # the training atlas of each seen caption

    out, reports = Path(args.out), Path(args.reports)
    with stage_run("evaluate", {**to_dict(cfg), "n_prompts": len(specs)}):
        ev = evaluate(model, specs, cfg, {i: np.asarray(a) for i, a in ceiling.items()}, progress=True)
        names = [f"{i:03d}-{slug(s.prompt)}" for i, s in enumerate(specs)]
        frames = turntable(ev.gaussians, cfg.sample)  # [B, F, H, W, 3]
        for i, name in enumerate(names):
            g = ev.gaussians._map(lambda t, i=i: t[i])
            write_ply(out / "plys" / f"{name}.ply", g)
            write_gif(out / "turntables" / f"{name}.gif", frames[i])
            gio.write_png(out / "atlases" / f"{name}.png", atlas_figure(ev.atlases[i], scale=2))
        gio.write_png(out / "views.png", sample_sheet(ev.views["generated"], [s.prompt for s in specs]))
        gio.write_text(out / "prompts.jsonl", "".join(
            json.dumps({"index": i, "prompt": s.prompt, "kind": s.kind, "held_out": s.held_out,
                        "parts": [list(p) for p in s.parts] if s.parts else None, "seed": ev.seeds[i],
                        "ceiling": i in ceiling, "file": names[i]}) + "\n" for i, s in enumerate(specs)))
        rows = pd.DataFrame(ev.rows)
        gio.write_parquet(out / "scores.parquet", rows)
        with gio.atomic_path(out / "scores.csv") as tmp:
            rows.to_csv(tmp, index=False)
        _write_plots(reports, rows, ev.metrics, gio)
        gen = rows[rows["source"] == "generated"].set_index("index")
        items = [{"prompt": s.prompt + (" (held out)" if s.held_out else ""), "turntable": f"turntables/{n}.gif",
                  "atlas": f"atlases/{n}.png",
                  "scores": {"seed": ev.seeds[i], **{k: _py(gen.loc[i, k]) for k in (
                      "colour_pred", "colour_correct", "shape_pred", "shape_correct", "both_correct", "clip_score")}}}
                 for i, (s, n) in enumerate(zip(specs, names))]
        gio.write_text(out / "gallery.html", gallery_html(items, _headline(ev.metrics)))
        gio.write_json(args.metrics, ev.metrics)

        mlflow.log_metrics(_numbers(ev.metrics))
        mlflow.set_tags({"gatlas.clip_score": ev.metrics["clip_score"]["status"],
                         "gatlas.vqa_score": ev.metrics["vqa_score"]["status"]})
        mlflow.log_artifacts(str(out / "turntables"), artifact_path="turntables")
        for sub in ("turntables", "atlases"):  # the gallery's pictures, beside it
            mlflow.log_artifacts(str(out / sub), artifact_path=f"gallery/{sub}")
        mlflow.log_artifact(str(out / "gallery.html"), artifact_path="gallery")
        for f in ("scores.parquet", "prompts.jsonl", "views.png"):
            mlflow.log_artifact(str(out / f))
        mlflow.log_artifact(args.metrics)
    gm = ev.metrics["generated"]
    print(f"evaluate: {len(specs)} prompts; generated colour {gm['colour_accuracy']}, shape {gm['shape_accuracy']}, "
          f"both {gm['both_accuracy']} (ceiling {ev.metrics.get('ceiling', {}).get('both_accuracy')}, floor "
          f"{ev.metrics['floor']['both_accuracy']}); CLIP {ev.metrics['clip_score']['status']}, "
          f"VQA {ev.metrics['vqa_score']['status']} -> {args.metrics}, {out / 'gallery.html'}")


def _py(v):
    """numpy/pandas scalars -> plain Python (None for missing) for the gallery."""
    import math

    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the metrics as flat MLflow metric names (``generated.colour_accuracy``)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


def _headline(m: dict) -> dict:
    h = {"prompts": m["n_prompts"], "held-out singles": m["n_single_held_out"], "views per prompt": m["n_views"],
         "DPM-Solver++ steps": m["steps"], "guidance": m["guidance"]}
    for src in ("generated", "ceiling", "floor"):
        if src in m:
            h[f"{src}: colour / shape / both"] = (f"{m[src]['colour_accuracy']} / {m[src]['shape_accuracy']} / "
                                                  f"{m[src]['both_accuracy']} (n={m[src]['n']})")
    for key in ("clip_score", "vqa_score"):
        c = m[key]
        h[key] = (f"generated {c.get('generated')}, ceiling {c.get('ceiling')}, floor {c.get('floor')} ({c.get('model')})"
                  if c["status"] == "ok" else f"skipped: {c['reason']}")
    return h


def _write_plots(reports: Path, rows, metrics: dict, gio) -> None:
    """DVC plot data: accuracy per source and metric (bars), per-prompt distances (lines)."""
    import pandas as pd

    acc = []
    for src in ("generated", "ceiling", "floor"):
        for metric in ("colour", "shape", "both"):
            v = metrics.get(src, {}).get(f"{metric}_accuracy")
            if v is not None:
                acc.append({"label": f"{src} {metric}", "source": src, "metric": metric, "accuracy": v})
    for metric, v in metrics["chance"].items():
        acc.append({"label": f"chance {metric}", "source": "chance", "metric": metric, "accuracy": v})
    with gio.atomic_path(reports / "accuracy.csv") as tmp:
        pd.DataFrame(acc).to_csv(tmp, index=False)
    wide = rows.pivot_table(index="index", columns="source", values=["colour_distance", "chamfer"], aggfunc="first")
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    cols = [f"{a}_{b}" for a in ("colour_distance", "chamfer") for b in ("generated", "ceiling", "floor")]
    wide = wide.reindex(columns=cols).reset_index()  # every plotted column, empty where a source has no object
    with gio.atomic_path(reports / "per_prompt.csv") as tmp:
        wide.to_csv(tmp, index=False)


if __name__ == "__main__":
    main_guard(main)
