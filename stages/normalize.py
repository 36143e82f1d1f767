"""DVC stage `normalize`: pixel-wise mean and std over all atlases (paper Sec. 5).

    python -m stages.normalize --atlas data/atlas --out data/normalize

Streams every atlas through a numerically stable running mean/variance (Chan's parallel
merge of Welford moments, float64), floors the std at ``normalize.std_floor`` so no pixel
divides by ~0, and writes ``<out>/stats.npz`` (mean, std, m2, count, std_floor). A
great-expectations suite checks the statistics (finite means, finite positive stds, enough
atlases). Atlases outside the bounds of a valid atlas (``gaussian_atlas.atlas.atlas_problem``:
finite, offsets within 2, opacities in [0, 1], log-scales up to ``atlas.max_log_scale``) are
left out of the statistics and listed with their reason in ``<out>/quarantine.csv``. Pictures of
the mean and std maps go to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import StageError, StageResult, StageRun, main_guard, stage_main

FLAGS = [("--atlas", "data/atlas", "atlas stage output"),
         ("--out", "data/normalize", "output folder"),
         ("--reports", "reports/normalize", "pictures + data docs")]


def body(run: StageRun) -> StageResult:
    import numpy as np
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import CHANNEL_NAMES, AtlasConfig, atlas_problem, training_rows
    from gaussian_atlas.checks import validate_stats
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.normalize import NormalizeConfig, RunningStats
    from gaussian_atlas.reports import stats_pictures

    args = run.args
    ncfg = run.config(NormalizeConfig)
    atlas_section = {k: v for k, v in run.params("atlas").items() if k not in ("batch_objects", "device")}
    acfg = from_dict(AtlasConfig, atlas_section, "params.yaml: atlas")
    std_floor, min_atlases, batch = ncfg.std_floor, ncfg.min_atlases, ncfg.batch
    index_path = Path(args.atlas) / "index.parquet"
    if not index_path.exists():
        raise StageError(f"no atlas index at {index_path}: run the atlas stage first")
    index = training_rows(pd.read_parquet(index_path))  # ceiling objects of held-out prompts stay out
    out, reports = Path(args.out), Path(args.reports)
    run.start({"std_floor": std_floor, "min_atlases": min_atlases, "batch": batch})
    stats = RunningStats(std_floor=std_floor)
    paths = list(index["path"])
    refused = []  # atlases outside the bounds (e.g. imported by hand): quarantined, not in the statistics
    for start in range(0, len(paths), batch):
        arrays = []
        for p in paths[start:start + batch]:
            with np.load(Path(args.atlas) / p) as z:
                problem = atlas_problem(z["atlas"], acfg)
                if problem:
                    refused.append({"path": p, "reason": problem})
                else:
                    arrays.append(z["atlas"])
        if arrays:
            stats.update(np.stack(arrays))
    gio.write_csv(out / "quarantine.csv", pd.DataFrame(refused, columns=["path", "reason"]))
    for r in refused:
        print(f"normalize: refused {r['path']}: {r['reason']}")
    if stats.count == 0:
        raise StageError(f"{index_path} lists no atlases: nothing to normalise")
    verdict = validate_stats(stats, min_atlases, docs_dir=reports / "data_docs")
    stats.save(out / "stats.npz")
    metrics = {"count": int(stats.count), "n_refused": len(refused), "floored_fraction": float(stats.floored_fraction()),
               "gx_success": bool(verdict["success"])}
    failed = sorted({m for ms in verdict["reasons"].values() for m in ms})
    return StageResult(
        {**metrics, "channels": stats.summary(CHANNEL_NAMES)},
        f"normalize: statistics of {stats.count} atlases -> {out / 'stats.npz'} "
        f"({metrics['floored_fraction']:.1%} of pixels at the std floor)",
        [out / "stats.npz", *stats_pictures(stats, reports), (reports / "data_docs", "data_docs")],
        expectations=verdict["expectations"],
        failure=None if verdict["success"] else "normalize: the statistics failed validation: " + "; ".join(failed[:5]))


main = stage_main("normalize", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
