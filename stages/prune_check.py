"""DVC stage `prune_check`: the quality gate between fitting and the atlas.

    python -m stages.prune_check --fits data/fits --out data/prune_check

A great-expectations suite (``fit_quality``) over the per-object fit metrics:
fit succeeded, 1 <= Gaussians <= tau, finite parameters, held-out PSNR >= the floor,
no degenerate scales or opacities, nothing flown away. Writes ``accepted.csv``
(id, shard, ply) and ``quarantine.csv`` (id, reason); the stage fails when more
than ``prune_check.max_rejected_fraction`` of the fits are rejected.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import Gate, StageError, StageResult, StageRun, main_guard, stage_main

FLAGS = [("--fits", "data/fits", "fit output folder"),
         ("--out", "data/prune_check", "output folder"),
         ("--reports", "reports/prune_check", "data docs folder")]


def body(run: StageRun) -> StageResult:
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.checks import validate_fits
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.prune import PruneCheckConfig

    params = run.params()
    if "tau" not in (params.get("fit") or {}):
        raise StageError("params.yaml: fit.tau is missing (prune_check's bound is the fit's, derived from it)")
    section = {**(params.get("prune_check") or {}), "tau": params["fit"]["tau"]}  # derived, written once
    cfg = from_dict(PruneCheckConfig, section, "params.yaml: prune_check", complete=True)
    table_path = Path(run.args.fits) / "metrics.parquet"
    if not table_path.exists():
        raise StageError(f"no fit metrics at {table_path}: run the fit stage first")
    table = pd.read_parquet(table_path)
    out, reports = Path(run.args.out), Path(run.args.reports)
    run.start(to_dict(cfg))
    verdict = validate_fits(table, cfg, docs_dir=reports / "data_docs")
    bad = verdict["reasons"]
    rejected = pd.DataFrame([{"id": table["id"][r], "reason": "; ".join(m)} for r, m in sorted(bad.items())],
                            columns=["id", "reason"])
    keep = table.drop(index=list(bad)).reset_index(drop=True)
    accepted = keep[["id", "shard", "ply", "n_gaussians", "psnr"]] if len(keep) else \
        pd.DataFrame(columns=["id", "shard", "ply", "n_gaussians", "psnr"])
    artifacts = [gio.write_csv(out / "accepted.csv", accepted), gio.write_csv(out / "quarantine.csv", rejected),
                 (reports / "data_docs", "data_docs")]
    frac = len(rejected) / max(1, len(table))
    metrics = {"n_fits": len(table), "n_accepted": len(accepted), "n_rejected": len(rejected),
               "rejected_fraction": frac}
    gate = Gate("gatlas.quality_gate", frac, cfg.max_rejected_fraction, "prune_check.max_rejected_fraction",
                "rejected", out / "quarantine.csv")
    summary = f"prune_check: {len(accepted)}/{len(table)} fits accepted, {len(rejected)} rejected (see {gate.reasons})"
    return StageResult(metrics, summary, artifacts, expectations=verdict["expectations"], gate=gate)


main = stage_main("prune_check", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
