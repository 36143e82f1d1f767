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

from pathlib import Path

from gaussian_atlas.config import resolve_device
from stages.common import StageError, StageResult, StageRun, main_guard, stage_main

FLAGS = [("--fits", "data/fits", "fit output folder"),
         ("--accepted", "data/prune_check/accepted.csv", "accepted fits"),
         ("--manifest", "data/ingested/manifest.parquet", "captions come from here"),
         ("--out", "data/atlas", "output folder"),
         ("--reports", "reports/atlas", "pictures folder")]


def body(run: StageRun) -> StageResult:
    import pandas as pd

    from gaussian_atlas.atlas import AtlasConfig, atlas_grid, write_atlases
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.reports import atlas_pictures, write_atlas_tables

    args = run.args
    section = dict(run.params("atlas"))
    batch = int(section.pop("batch_objects", 8))
    device = resolve_device(section.pop("device", "auto"))
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

    print(f"atlas: {len(items)} accepted fits -> atlases [16, {cfg.side}, {cfg.side}], layout {cfg.layout}, "
          f"on {device}", flush=True)
    run.start({**to_dict(cfg), "batch_objects": batch, "device": device})
    atlas_grid(cfg, device)  # once per N (or atlas.grid's file), then cached
    t_grid = run.elapsed()
    print(f"atlas: plane index ready in {t_grid:.1f} s", flush=True)
    rows, quarantine = write_atlases(items, cfg, out, device=device, batch=batch)
    seconds = run.elapsed()
    index, q = write_atlas_tables(out, rows, quarantine)
    metrics = {"n_objects": len(index), "n_quarantined": len(q), "side": cfg.side,
               "n_gaussians_per_atlas": cfg.side ** 2, "seconds": round(seconds, 2),
               "grid_seconds": round(t_grid, 3), "seconds_per_object": round(seconds / max(1, len(items)), 4),
               "padded_fraction_mean": float(1 - (index["n_real"] / cfg.side ** 2).mean()) if len(index) else 0.0,
               "layout": cfg.layout,
               # structure: share of right/down pixel pairs that are 3D 8-nearest neighbours, and their distance
               # relative to the 8-NN distance (gaussian_atlas.atlas.neighbour_coherence)
               "coherence_mean": float(index["coherence"].mean()) if len(index) else float("nan"),
               "distance_ratio_median": float(index["distance_ratio"].median()) if len(index) else float("nan")}
    pictures = atlas_pictures(out, index, args.reports, cfg.side)
    return StageResult(
        metrics, f"atlas: {len(index)} atlases [16, {cfg.side}, {cfg.side}], {len(q)} quarantined, {seconds:.1f} s "
        f"on {device} -> {out}", [out / "index.parquet", out / "quarantine.csv", *((p, "atlas_channels") for p in pictures)],
        failure=f"atlas: no atlas could be built; reasons in {out / 'quarantine.csv'}" if len(accepted) and not len(index)
        else None)


main = stage_main("atlas", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
