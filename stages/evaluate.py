"""DVC stage `evaluate`: sample the trained model and score it (paper Sec. 6).

    python -m stages.evaluate --model models/atlas-unet/model --atlas data/atlas --out data/evaluate

Reads ``params.yaml: evaluate``. Prompts: ``evaluate.prompts`` (a text file) or the
built-in benchmark prompts chosen from the training captions (``<atlas>/index.parquet``),
including shape x colour combinations never seen in training. For each prompt: DPM-Solver++
sampling of ``samples_per_prompt`` objects (seeds), ``n_views`` random views each, procedural colour/shape scores, CLIP and VQA scores when
their weights are on disk (else recorded as skipped with the reason), the same scores for the
ceiling (fits with that caption: training objects for seen prompts, the ``split == "ceiling"``
objects rendered for held-out ones) and the floor (random atlases). Seen and held-out prompts are
reported apart, each with 95 % bootstrap intervals over prompts x samples.

Writes ``<out>/``: ``prompts.jsonl`` (prompt, parts, held-out flag, seeds), ``scores.parquet``
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
    from gaussian_atlas.atlas import atlas_figure, training_rows
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.evaluate import (EvaluateConfig, ceiling_atlases, evaluate, gallery_html, index_prompts,
                                         read_prompts, slug)
    from gaussian_atlas.gaussians import write_ply
    from gaussian_atlas.sample import load_atlas_model, sample_sheet, turntable, write_gif

    cfg = from_dict(EvaluateConfig, load_params("evaluate", args.params), "params.yaml: evaluate", complete=True)
    atlas_dir = Path(args.atlas)
    index_path = atlas_dir / "index.parquet"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} does not exist: run the atlas stage first")
    index = pd.read_parquet(index_path)
    captions = [str(c) for c in training_rows(index)["caption"].fillna("")]
    # built-in prompts: seen ones from the training split, held-out ones declared by the data's ceiling split
    specs = read_prompts(cfg.prompts, captions) if cfg.prompts else index_prompts(index, cfg)
    if not specs:
        raise ValueError(f"no evaluation prompts: {index_path} has no generator captions and evaluate.prompts is null")
    model = load_atlas_model(args.model, device=cfg.torch_device())
    # ceiling: fits with the prompt as caption (training objects for seen prompts, the split's ceiling objects
    # for held-out ones), up to one per sample
    ceiling = ceiling_atlases(index, atlas_dir, specs, limit=cfg.samples_per_prompt)

    out, reports = Path(args.out), Path(args.reports)
    with stage_run("evaluate", {**to_dict(cfg), "n_prompts": len(specs)}):
        ev = evaluate(model, specs, cfg, {i: np.asarray(a) for i, a in ceiling.items()}, progress=True)
        S = cfg.samples_per_prompt
        names = [f"{i:03d}-{slug(s.prompt)}" for i, s in enumerate(specs)]
        first = [i * S for i in range(len(specs))]  # each prompt's first sample: PLY, turntable, atlas picture
        frames = turntable(ev.gaussians._map(lambda t: t[first]), cfg.sample)  # [P, F, H, W, 3]
        for i, name in enumerate(names):
            g = ev.gaussians._map(lambda t, j=first[i]: t[j])
            write_ply(out / "plys" / f"{name}.ply", g)
            write_gif(out / "turntables" / f"{name}.gif", frames[i])
            gio.write_png(out / "atlases" / f"{name}.png", atlas_figure(ev.atlases[first[i]], scale=2))
        gio.write_png(out / "views.png", sample_sheet(ev.views["generated"],  # a row of views per sample
                                                      [f"{s.prompt} #{k}" for s in specs for k in range(S)]))
        gio.write_text(out / "prompts.jsonl", "".join(
            json.dumps({"index": i, "prompt": s.prompt, "kind": s.kind, "held_out": s.held_out,
                        "parts": [list(p) for p in s.parts] if s.parts else None,
                        "seeds": ev.seeds[i * S:(i + 1) * S], "ceiling": i in ceiling, "file": names[i]}) + "\n"
            for i, s in enumerate(specs)))
        rows = pd.DataFrame(ev.rows)
        gio.write_parquet(out / "scores.parquet", rows)
        with gio.atomic_path(out / "scores.csv") as tmp:
            rows.to_csv(tmp, index=False)
        _write_plots(reports, rows, ev.metrics, gio)
        gen = rows[rows["source"] == "generated"]
        items = [{"prompt": s.prompt + (" (held out)" if s.held_out else " (seen)"), "turntable": f"turntables/{n}.gif",
                  "atlas": f"atlases/{n}.png", "scores": _prompt_scores(gen[gen["index"] == i], ev.seeds[i * S:(i + 1) * S])}
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


def _prompt_scores(g, seeds: list[int]) -> dict:
    """One prompt's gallery scores over its samples: predictions of the first, accuracies over all."""
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


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the metrics as flat MLflow metric names (``generated.colour_accuracy``)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
        elif isinstance(v, list) and len(v) == 2 and key.endswith("_ci95") and None not in v:
            out[key + "_low"], out[key + "_high"] = float(v[0]), float(v[1])
    return out


def _headline(m: dict) -> dict:
    h = {"prompts": m["n_prompts"], "samples per prompt": m["samples_per_prompt"],
         "held-out singles": m["n_single_held_out"], "views per sample": m["n_views"],
         "DPM-Solver++ steps": m["steps"], "guidance": m["guidance"], "intervals": m["ci"]}

    def acc(b: dict) -> str:
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


def _write_plots(reports: Path, rows, metrics: dict, gio) -> None:
    """DVC plot data: accuracy per source and metric (bars), per-prompt distances (lines)."""
    import pandas as pd

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
    with gio.atomic_path(reports / "accuracy.csv") as tmp:
        pd.DataFrame(acc).to_csv(tmp, index=False)
    wide = rows.pivot_table(index="index", columns="source", values=["colour_distance", "chamfer"], aggfunc="mean")
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    cols = [f"{a}_{b}" for a in ("colour_distance", "chamfer") for b in ("generated", "ceiling", "floor")]
    wide = wide.reindex(columns=cols).reset_index()  # every plotted column, empty where a source has no object
    with gio.atomic_path(reports / "per_prompt.csv") as tmp:
        wide.to_csv(tmp, index=False)


if __name__ == "__main__":
    main_guard(main)
