"""DVC stage `atlas`: accepted fits -> Gaussian Atlases ``[16, S, S]`` (paper Sec. 4).

    python -m stages.atlas --fits data/fits --accepted data/prune_check/accepted.csv --out data/atlas

Reads ``params.yaml: atlas``. Per object: normalise into the unit sphere, count to
N = side² (pad with transparent copies / keep the most visible), optimal assignment to
the Fibonacci sphere, the cached sphere->grid index (computed once per N, in
``atlas.cache_dir``), the 16-channel atlas. Writes ``<out>/atlases/<shard>/<id>.npz``
(atlas + centre/scale), ``<out>/index.parquet`` (id, caption, path, centre, scale, split, ...;
split "ceiling" marks objects rendered for held-out prompts: scored, never trained on),
``<out>/quarantine.csv`` (objects whose PLY is broken: id, reason), ``metrics/atlas.json``,
and atlas channel pictures (paper Fig. 6) for a few objects, logged to MLflow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stages.common import StageError, load_params, main_guard, stage_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", default="data/fits", help="fit output folder (default: %(default)s)")
    ap.add_argument("--accepted", default="data/prune_check/accepted.csv", help="accepted fits (default: %(default)s)")
    ap.add_argument("--manifest", default="data/ingested/manifest.parquet", help="captions come from here")
    ap.add_argument("--out", default="data/atlas", help="output folder (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/atlas.json", help="DVC metrics file (default: %(default)s)")
    ap.add_argument("--reports", default="reports/atlas", help="pictures folder (default: %(default)s)")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    args = ap.parse_args(argv)

    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import AtlasConfig, atlas_figure, atlas_grid, write_atlases
    from gaussian_atlas.config import from_dict, to_dict

    section = dict(load_params("atlas", args.params))
    batch = int(section.pop("batch_objects", 8))
    device = section.pop("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cfg = from_dict(AtlasConfig, section, "params.yaml: atlas", complete=True)
    if not Path(args.accepted).exists():
        raise StageError(f"no accepted fits at {args.accepted}: run prune_check first")
    accepted = pd.read_csv(args.accepted)
    manifest = pd.read_parquet(args.manifest) if Path(args.manifest).exists() else pd.DataFrame(columns=["id"])
    captions = dict(zip(manifest["id"], manifest["caption"])) if "caption" in manifest else {}
    splits = dict(zip(manifest["id"], manifest["split"])) if "split" in manifest else {}
    items = [{"id": r.id, "shard": r.shard, "src": str(Path(args.fits) / r.ply), "caption": captions.get(r.id, ""),
              "split": splits.get(r.id, "train")} for r in accepted.itertuples(index=False)]
    out = Path(args.out)

    with stage_run("atlas", {**to_dict(cfg), "batch_objects": batch, "device": device}):
        t0 = time.perf_counter()
        atlas_grid(cfg, device)  # once per N (or atlas.grid's file), then cached
        t_grid = time.perf_counter() - t0
        rows, quarantine = write_atlases(items, cfg, out, device=device, batch=batch)
        seconds = time.perf_counter() - t0
        index = pd.DataFrame(rows).sort_values("id").reset_index(drop=True) if rows else pd.DataFrame(
            columns=["id", "caption", "path", "shard", "center_x", "center_y", "center_z", "scale", "n_real",
                     "n_input", "split", "coherence", "distance_ratio"])
        gio.write_parquet(out / "index.parquet", index)
        q = pd.DataFrame(quarantine, columns=["id", "reason"])
        with gio.atomic_path(out / "quarantine.csv") as tmp:
            q.to_csv(tmp, index=False)
        metrics = {"n_objects": len(index), "n_quarantined": len(q), "side": cfg.side,
                   "n_gaussians_per_atlas": cfg.side ** 2, "seconds": round(seconds, 2),
                   "grid_seconds": round(t_grid, 3), "seconds_per_object": round(seconds / max(1, len(items)), 4),
                   "padded_fraction_mean": float(1 - (index["n_real"] / cfg.side ** 2).mean()) if len(index) else 0.0,
                   "layout": cfg.layout,
                   # structure: share of right/down pixel pairs that are 3D 8-nearest neighbours, and their distance
                   # relative to the 8-NN distance (gaussian_atlas.atlas.neighbour_coherence)
                   "coherence_mean": float(index["coherence"].mean()) if len(index) else float("nan"),
                   "distance_ratio_median": float(index["distance_ratio"].median()) if len(index) else float("nan")}
        gio.write_json(args.metrics, metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for f in (out / "index.parquet", out / "quarantine.csv"):
            mlflow.log_artifact(str(f))
        for r in index.head(4).itertuples(index=False):
            with np.load(out / r.path) as z:
                fig = atlas_figure(z["atlas"], scale=max(1, 128 // cfg.side))
            mlflow.log_artifact(str(gio.write_png(Path(args.reports) / f"channels_{r.id}.png", fig)),
                                artifact_path="atlas_channels")
    print(f"atlas: {len(index)} atlases [16, {cfg.side}, {cfg.side}], {len(q)} quarantined, {seconds:.1f} s "
          f"on {device} -> {out}")
    if len(accepted) and not len(index):
        raise StageError(f"atlas: no atlas could be built; reasons in {out / 'quarantine.csv'}")


if __name__ == "__main__":
    main_guard(main)
