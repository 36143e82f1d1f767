"""DVC stage `ingest`: validate a render dataset and write the internal layout + manifest.

    python -m stages.ingest --out data/ingested

Reads ``params.yaml: ingest`` (source folder, captions, layout, thresholds).
Bad objects are quarantined (``<out>/quarantine.csv``: id, source_path, reason)
and the rest go on; the stage fails only when the quarantined fraction is above
``ingest.max_quarantine_fraction``. Great-expectations data docs go to
``reports/ingest/data_docs/index.html``; everything is logged to MLflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.common import check_gate, gate_tag, load_params, main_guard, stage_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/ingested", help="internal-layout folder to write (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/ingest.json", help="DVC metrics file (default: %(default)s)")
    ap.add_argument("--reports", default="reports/ingest", help="data docs + contact sheet folder")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    args = ap.parse_args(argv)

    import mlflow
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.data import IngestConfig, ingest, load_object
    from gaussian_atlas.viz import contact_sheet

    cfg = from_dict(IngestConfig, load_params("ingest", args.params), "params.yaml: ingest", complete=True)
    out, reports = Path(args.out), Path(args.reports)
    with stage_run("ingest", to_dict(cfg)):
        summary = ingest(cfg, out, docs_dir=reports / "data_docs", progress=True)
        metrics = {k: summary[k] for k in ("n_found", "n_accepted", "n_quarantined", "quarantined_fraction",
                                           "n_views_total")}
        metrics["seconds"] = round(summary["seconds"], 2)
        gio.write_json(args.metrics, {**metrics, "failed_expectations": summary["expectations"]})
        mlflow.log_metrics(metrics)
        manifest = pd.read_parquet(out / "manifest.parquet")
        summary_csv = reports / "manifest_summary.csv"
        with gio.atomic_path(summary_csv) as tmp:
            manifest.describe(include="all").T.to_csv(tmp)
        for f in (out / "manifest.parquet", out / "quarantine.csv", summary_csv):
            mlflow.log_artifact(str(f))
        if summary["data_docs"]:
            mlflow.log_artifacts(str(reports / "data_docs"), artifact_path="data_docs")
        if len(manifest):
            rows = manifest.head(32)
            images = [(load_object(out / p, views=[0])["rgb"][0] * 255 + 0.5).astype("uint8") for p in rows["path"]]
            sheet = reports / "contact_sheet.png"
            gio.write_png(sheet, contact_sheet(images, list(rows["caption"]), ncols=8))
            mlflow.log_artifact(str(sheet))
        frac = summary["quarantined_fraction"]
        gate_tag("gatlas.quarantine_gate", frac, cfg.max_quarantine_fraction)
    print(f"ingest: {summary['n_accepted']}/{summary['n_found']} objects accepted, {summary['n_quarantined']} "
          f"quarantined (see {out / 'quarantine.csv'}); data docs: {summary['data_docs']}")
    check_gate("ingest", frac, cfg.max_quarantine_fraction, "ingest.max_quarantine_fraction", "quarantined",
               out / "quarantine.csv")


if __name__ == "__main__":
    main_guard(main)
