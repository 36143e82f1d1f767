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
``gallery.html`` (self-contained: its pictures embedded); ``metrics/evaluate.json``; DVC plot data in
``reports/evaluate/``. MLflow: the metrics, the turntables, the atlas pictures, the gallery and the scores table.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.common import StageResult, StageRun, main_guard, nested_numbers, stage_main

FLAGS = [("--model", "models/atlas-unet/model", "trained model folder"),
         ("--atlas", "data/atlas", "training atlases: captions + ceiling"),
         ("--out", "data/evaluate", "output folder"),
         ("--reports", "reports/evaluate", "DVC plot data")]


def body(run: StageRun) -> StageResult:
    import numpy as np
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import training_rows
    from gaussian_atlas.config import to_dict
    from gaussian_atlas.evaluate import (EvaluateConfig, ceiling_atlases, evaluate, gallery_html, index_prompts,
                                         read_prompts, slug)
    from gaussian_atlas.reports import evaluation_plots, gallery_headline, prompt_scores, write_sample
    from gaussian_atlas.sample import load_atlas_model, sample_sheet, turntable

    args = run.args
    cfg = run.config(EvaluateConfig)
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

    out = Path(args.out)
    run.start({**to_dict(cfg), "n_prompts": len(specs)})
    ev = evaluate(model, specs, cfg, {i: np.asarray(a) for i, a in ceiling.items()}, progress=True)
    S = cfg.samples_per_prompt
    names = [f"{i:03d}-{slug(s.prompt)}" for i, s in enumerate(specs)]
    first = [i * S for i in range(len(specs))]  # each prompt's first sample: PLY, turntable, atlas picture
    frames = turntable(ev.gaussians._map(lambda t: t[first]), cfg.sample)  # [P, F, H, W, 3]
    for i, name in enumerate(names):
        write_sample(ev.gaussians._map(lambda t, j=first[i]: t[j]), frames[i], ev.atlases[first[i]],
                     ply=out / "plys" / f"{name}.ply", gif=out / "turntables" / f"{name}.gif",
                     png=out / "atlases" / f"{name}.png")
    gio.write_png(out / "views.png", sample_sheet(ev.views["generated"],  # a row of views per sample
                                                  [f"{s.prompt} #{k}" for s in specs for k in range(S)]))
    gio.write_text(out / "prompts.jsonl", "".join(
        json.dumps({"index": i, "prompt": s.prompt, "kind": s.kind, "held_out": s.held_out,
                    "parts": [list(p) for p in s.parts] if s.parts else None,
                    "seeds": ev.seeds[i * S:(i + 1) * S], "ceiling": i in ceiling, "file": names[i]}) + "\n"
        for i, s in enumerate(specs)))
    rows = pd.DataFrame(ev.rows)
    gio.write_parquet(out / "scores.parquet", rows)
    gio.write_csv(out / "scores.csv", rows)
    evaluation_plots(args.reports, rows, ev.metrics)
    gen = rows[rows["source"] == "generated"]
    items = [{"prompt": s.prompt + (" (held out)" if s.held_out else " (seen)"), "turntable": f"turntables/{n}.gif",
              "atlas": f"atlases/{n}.png", "scores": prompt_scores(gen[gen["index"] == i], ev.seeds[i * S:(i + 1) * S])}
             for i, (s, n) in enumerate(zip(specs, names))]
    gio.write_text(out / "gallery.html", gallery_html(items, gallery_headline(ev.metrics), root=out))  # pictures inside

    m = ev.metrics
    gm = m["generated"]
    summary = (f"evaluate: {len(specs)} prompts; generated colour {gm['colour_accuracy']}, shape {gm['shape_accuracy']}, "
               f"both {gm['both_accuracy']} (ceiling {m.get('ceiling', {}).get('both_accuracy')}, floor "
               f"{m['floor']['both_accuracy']}); CLIP {m['clip_score']['status']}, "
               f"VQA {m['vqa_score']['status']} -> {args.metrics}, {out / 'gallery.html'}")
    artifacts = [(out / "turntables", "turntables"), (out / "atlases", "atlases"),
                 (out / "gallery.html", "gallery"),
                 *(out / f for f in ("scores.parquet", "prompts.jsonl", "views.png")), args.metrics]
    return StageResult(m, summary, artifacts, mlflow_metrics=nested_numbers(m),
                       tags={"gatlas.clip_score": m["clip_score"]["status"], "gatlas.vqa_score": m["vqa_score"]["status"]})


main = stage_main("evaluate", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
