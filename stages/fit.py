"""DVC stage `fit`: one bounded-count 3D Gaussian splat per ingested object.

    python -m stages.fit --data data/ingested --out data/fits

Reads ``params.yaml: fit``; ``fit.method`` picks the fitter: ``plain`` (free Gaussians,
gsplat densification) or ``anchors`` (the paper's Scaffold-GS-style anchors, baked into
the same PLYs). Objects are fitted in chunks handed to a Prefect task
runner (threads by default, Dask with ``fit.runner: dask``; ``stages/fanout.py``), several objects per
GPU batch (``fit.batch_objects``). Per object: ``<out>/objects/<shard>/<id>.ply``
(INRIA layout) and ``<id>.json`` (metrics), written atomically; finished objects
are skipped on rerun, so a killed run loses only the objects in flight.
Also writes ``<out>/metrics.parquet`` (one row per object), ``metrics/fit.json``,
and pictures in ``reports/fit/``; logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gaussian_atlas.config import resolve_device
from stages.common import StageError, StageResult, StageRun, main_guard, stage_main

if TYPE_CHECKING:
    from gaussian_atlas.fit import FitConfig

RUNNER_KEYS = ("runner", "workers", "dask_address", "chunk_size", "device")
FLAGS = [("--data", "data/ingested", "ingest output folder"),
         ("--out", "data/fits", "fit output folder"),
         ("--reports", "reports/fit", "pictures folder")]


def fit_config(section: dict) -> tuple["FitConfig", dict]:
    """``params.yaml: fit`` -> (the fit's :class:`FitConfig`, the runner keys). ``method`` picks the
    fitter (``plain`` | ``anchors``, the latter configured by the nested ``anchors:`` section)."""
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.fit import FitConfig

    section = dict(section)
    run = {k: section.pop(k) for k in RUNNER_KEYS if k in section}
    return from_dict(FitConfig, section, "params.yaml: fit", complete=True), run


def body(run: StageRun) -> StageResult:
    import pandas as pd
    import torch

    from gaussian_atlas import io as gio
    from gaussian_atlas.config import to_dict
    from gaussian_atlas.data import load_manifest
    from gaussian_atlas.fit import fit_chunk
    from gaussian_atlas.reports import fit_pictures
    from stages.fanout import fan_out

    args = run.args
    cfg, runner = fit_config(run.params("fit"))
    device = resolve_device(runner.get("device", "auto"))
    if device == "cpu":  # parallel chunks share the cores instead of fighting over them
        import os

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(runner.get("workers", 1)))))
    manifest = load_manifest(args.data)
    if not len(manifest):
        raise StageError(f"{args.data}/manifest.parquet has no objects: nothing to fit")
    out = Path(args.out)
    items = manifest[["id", "path", "shard"]].to_dict("records")
    chunk = int(runner.get("chunk_size", max(cfg.batch_objects, 8)))
    chunks = [(f"objects {i}-{min(i + chunk, len(items)) - 1}", (items[i:i + chunk], str(args.data), str(out), cfg),
               {"device": device, "progress": False, "report": True}) for i in range(0, len(items), chunk)]

    run.start({**to_dict(cfg), **runner, "device": device})
    rows = fan_out(fit_chunk, chunks, runner=runner.get("runner", "threads"), workers=int(runner.get("workers", 1)),
                   address=runner.get("dask_address"), flow_name="fit-objects")
    seconds = run.elapsed()
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
    pictures = fit_pictures(table, Path(args.data), out, manifest, Path(args.reports))
    return StageResult(metrics, f"fit ({cfg.method}): {metrics['n_ok']}/{metrics['n_objects']} objects, mean PSNR "
                       f"{metrics['psnr_mean']:.2f} dB, mean {metrics['n_gaussians_mean']:.0f} Gaussians, {seconds:.1f} s "
                       f"on {device} -> {out}", artifacts=[out / "metrics.parquet", *pictures])


main = stage_main("fit", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
