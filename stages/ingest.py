"""DVC stage `ingest`: validate a render dataset and write the internal layout + manifest.

    python -m stages.ingest --out data/ingested

Reads ``params.yaml: ingest`` (source folder, captions, layout, thresholds).
Bad objects are quarantined (``<out>/quarantine.csv``: id, source_path, reason)
and the rest go on; the stage fails only when the quarantined fraction is above
``ingest.max_quarantine_fraction``. Great-expectations data docs go to
``reports/ingest/data_docs/index.html``; everything is logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import Gate, StageResult, StageRun, main_guard, stage_main

FLAGS = [("--out", "data/ingested", "internal-layout folder to write"),
         ("--reports", "reports/ingest", "data docs + contact sheet folder")]


def body(run: StageRun) -> StageResult:
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.config import to_dict
    from gaussian_atlas.data import IngestConfig, ingest
    from gaussian_atlas.reports import manifest_sheet

    cfg = run.config(IngestConfig)
    out, reports = Path(run.args.out), Path(run.args.reports)
    run.start(to_dict(cfg))
    summary = ingest(cfg, out, docs_dir=reports / "data_docs", progress=True)
    metrics = {k: summary[k] for k in ("n_found", "n_accepted", "n_quarantined", "quarantined_fraction",
                                       "n_views_total")}
    metrics["seconds"] = round(summary["seconds"], 2)
    manifest = pd.read_parquet(out / "manifest.parquet")
    artifacts = [out / "manifest.parquet", out / "quarantine.csv",
                 gio.write_csv(reports / "manifest_summary.csv", manifest.describe(include="all").T, index=True)]
    if summary["data_docs"]:
        artifacts.append((reports / "data_docs", "data_docs"))
    if len(manifest):
        artifacts.append(gio.write_png(reports / "contact_sheet.png", manifest_sheet(out, manifest, limit=32)))
    return StageResult(
        metrics, f"ingest: {summary['n_accepted']}/{summary['n_found']} objects accepted, {summary['n_quarantined']} "
        f"quarantined (see {out / 'quarantine.csv'}); data docs: {summary['data_docs']}", artifacts,
        expectations=summary["expectations"],
        gate=Gate("gatlas.quarantine_gate", summary["quarantined_fraction"], cfg.max_quarantine_fraction,
                  "ingest.max_quarantine_fraction", "quarantined", out / "quarantine.csv"))


main = stage_main("ingest", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
