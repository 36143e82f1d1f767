"""DVC stage `prune_check`: the quality gate between fitting and the atlas.

    python -m stages.prune_check --fits data/fits --out data/prune_check

A great-expectations suite (``fit_quality``) over the per-object fit metrics:
fit succeeded, 1 <= Gaussians <= tau, finite parameters, held-out PSNR >= the floor,
no degenerate scales or opacities, nothing flown away. Writes ``accepted.csv``
(id, shard, ply) and ``quarantine.csv`` (id, reason); the stage fails when more
than ``prune_check.max_rejected_fraction`` of the fits are rejected.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.common import StageError, check_gate, gate_tag, load_params, main_guard, stage_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", default="data/fits", help="fit output folder (default: %(default)s)")
    ap.add_argument("--out", default="data/prune_check", help="output folder (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/prune_check.json", help="DVC metrics file")
    ap.add_argument("--reports", default="reports/prune_check", help="data docs folder")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    args = ap.parse_args(argv)

    import mlflow
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.checks import validate_fits
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.prune import PruneCheckConfig

    params = load_params(None, args.params)
    if "tau" not in (params.get("fit") or {}):
        raise StageError("params.yaml: fit.tau is missing (prune_check's bound is the fit's, derived from it)")
    section = {**(params.get("prune_check") or {}), "tau": params["fit"]["tau"]}  # derived, written once
    cfg = from_dict(PruneCheckConfig, section, "params.yaml: prune_check", complete=True)
    table_path = Path(args.fits) / "metrics.parquet"
    if not table_path.exists():
        raise StageError(f"no fit metrics at {table_path}: run the fit stage first")
    table = pd.read_parquet(table_path)
    out, reports = Path(args.out), Path(args.reports)
    with stage_run("prune_check", to_dict(cfg)):
        verdict = validate_fits(table, cfg, docs_dir=reports / "data_docs")
        bad = verdict["reasons"]
        rejected = pd.DataFrame([{"id": table["id"][r], "reason": "; ".join(m)} for r, m in sorted(bad.items())],
                                columns=["id", "reason"])
        keep = table.drop(index=list(bad)).reset_index(drop=True)
        accepted = keep[["id", "shard", "ply", "n_gaussians", "psnr"]] if len(keep) else \
            pd.DataFrame(columns=["id", "shard", "ply", "n_gaussians", "psnr"])
        with gio.atomic_path(out / "accepted.csv") as tmp:
            accepted.to_csv(tmp, index=False)
        with gio.atomic_path(out / "quarantine.csv") as tmp:
            rejected.to_csv(tmp, index=False)
        frac = len(rejected) / max(1, len(table))
        metrics = {"n_fits": len(table), "n_accepted": len(accepted), "n_rejected": len(rejected),
                   "rejected_fraction": frac}
        gio.write_json(args.metrics, {**metrics, "failed_expectations": verdict["expectations"]})
        mlflow.log_metrics(metrics)
        for f in (out / "accepted.csv", out / "quarantine.csv"):
            mlflow.log_artifact(str(f))
        mlflow.log_artifacts(str(reports / "data_docs"), artifact_path="data_docs")
        gate_tag("gatlas.quality_gate", frac, cfg.max_rejected_fraction)
    print(f"prune_check: {len(accepted)}/{len(table)} fits accepted, {len(rejected)} rejected "
          f"(see {out / 'quarantine.csv'})")
    check_gate("prune_check", frac, cfg.max_rejected_fraction, "prune_check.max_rejected_fraction", "rejected",
               out / "quarantine.csv")


if __name__ == "__main__":
    main_guard(main)
