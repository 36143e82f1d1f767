"""DVC stage `generate`: render the built-in procedural dataset (the embedded default).

    python -m stages.generate --out data/procedural

Reads ``params.yaml: generate``; writes the NeRF-synthetic layout, captions.jsonl,
``metrics/generate.json`` and a contact sheet; logs all of it to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import StageResult, StageRun, main_guard, stage_main

FLAGS = [("--out", "data/procedural", "dataset folder to write"),
         ("--sheet", "reports/generate/contact_sheet.png", "contact sheet PNG")]


def body(run: StageRun) -> StageResult:
    from gaussian_atlas import io as gio
    from gaussian_atlas.config import to_dict
    from gaussian_atlas.procedural import ProceduralConfig, generate_dataset
    from gaussian_atlas.reports import dataset_sheet

    out = Path(run.args.out)
    cfg = run.config(ProceduralConfig)
    run.start(to_dict(cfg))
    summary = generate_dataset(cfg, out, progress=True)
    seconds = run.elapsed()
    metrics = {"n_objects": summary["n_objects"], "n_rendered": summary["n_rendered"],
               "n_views_total": summary["n_objects"] * cfg.render.views.n_views, "seconds": round(seconds, 2)}
    sheet = gio.write_png(run.args.sheet, dataset_sheet(out, limit=32))
    return StageResult(metrics, f"generate: {metrics['n_objects']} objects ({metrics['n_rendered']} rendered now) in "
                       f"{seconds:.1f} s -> {run.args.out}", artifacts=[sheet, out / "captions.jsonl"])


main = stage_main("generate", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
