"""DVC stage `atlas`: accepted fits -> Gaussian Atlases ``[16, S, S]`` (paper Sec. 4).

    python -m stages.atlas --fits data/fits --accepted data/prune_check/accepted.csv --out data/atlas

Reads ``params.yaml: atlas``. Per object: normalise into the unit sphere, count to
N = side² (pad with transparent copies / keep the most visible), optimal assignment to
the Fibonacci sphere, the cached sphere->grid index (computed once per N, in
``atlas.cache_dir``), the 16-channel atlas. Writes ``<out>/atlases/<shard>/<id>.npz``
(atlas + centre/scale), ``<out>/index.parquet`` (id, caption, path, centre, scale, ...),
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
    from tqdm.auto import tqdm

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import AtlasConfig, atlas_figure, build_atlases, sphere_to_grid
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.gaussians import read_ply

    section = dict(load_params("atlas", args.params))
    batch = int(section.pop("batch_objects", 8))
    device = section.pop("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cfg = from_dict(AtlasConfig, section, "params.yaml: atlas")
    if not Path(args.accepted).exists():
        raise StageError(f"no accepted fits at {args.accepted}: run prune_check first")
    accepted = pd.read_csv(args.accepted)
    captions = dict(pd.read_parquet(args.manifest, columns=["id", "caption"]).values) \
        if Path(args.manifest).exists() else {}
    out = Path(args.out)
    stamp = atlas_stamp(cfg)

    with stage_run("atlas", {**to_dict(cfg), "batch_objects": batch, "device": device}):
        t0 = time.perf_counter()
        grid = sphere_to_grid(cfg.side, cfg.method, cfg.cache_dir, device=device)  # once per N, cached
        t_grid = time.perf_counter() - t0
        rows, quarantine, todo = [], [], []
        for r in accepted.itertuples(index=False):
            path = out / "atlases" / r.shard / f"{r.id}.npz"
            if path.exists():
                with np.load(path) as z:
                    if str(z["stamp"]) == stamp:  # finished earlier with the same settings and code
                        rows.append(_row(r, path.relative_to(out), z, captions))
                        continue
            todo.append((r, path))
        bar = tqdm(total=len(todo), desc="atlas", unit="obj")
        for start in range(0, len(todo), batch):
            chunk, gs = [], []
            for r, path in todo[start:start + batch]:
                try:
                    gs.append(read_ply(Path(args.fits) / r.ply))
                    chunk.append((r, path))
                except (OSError, ValueError) as exc:  # broken PLY: quarantined, the rest go on
                    quarantine.append({"id": r.id, "reason": str(exc)})
            good = []
            for (r, path), g in zip(chunk, gs):
                bad = g.validate()
                if bad or len(g) == 0:
                    quarantine.append({"id": r.id, "reason": "; ".join(bad) or "zero Gaussians"})
                else:
                    good.append(((r, path), g))
            if good:
                atlases, metas = build_atlases([g for _, g in good], cfg, device=device)
                for ((r, path), _), a, m in zip(good, atlases.cpu().numpy(), metas):
                    with gio.atomic_path(path, suffix=".npz") as tmp:
                        np.savez(tmp, atlas=a.astype(np.float32), center=np.asarray(m["center"]),
                                 scale=m["scale"], n_real=m["n_real"], n_input=m["n_input"], stamp=stamp)
                    with np.load(path) as z:
                        rows.append(_row(r, path.relative_to(out), z, captions))
            bar.update(len(todo[start:start + batch]))
        bar.close()
        seconds = time.perf_counter() - t0

        index = pd.DataFrame(rows).sort_values("id").reset_index(drop=True)
        gio.write_parquet(out / "index.parquet", index)
        q = pd.DataFrame(quarantine, columns=["id", "reason"])
        with gio.atomic_path(out / "quarantine.csv") as tmp:
            q.to_csv(tmp, index=False)
        metrics = {"n_objects": len(index), "n_quarantined": len(q), "side": cfg.side,
                   "n_gaussians_per_atlas": cfg.side ** 2, "seconds": round(seconds, 2),
                   "grid_seconds": round(t_grid, 3),
                   "seconds_per_object": round(seconds / max(1, len(todo)), 4),
                   "padded_fraction_mean": float(1 - (index["n_real"] / cfg.side ** 2).mean()) if len(index) else 0.0}
        gio.write_json(args.metrics, metrics)
        mlflow.log_metrics(metrics)
        for f in (out / "index.parquet", out / "quarantine.csv"):
            mlflow.log_artifact(str(f))
        reports = Path(args.reports)
        pics = []
        for r in index.head(4).itertuples(index=False):
            with np.load(out / r.path) as z:
                fig = atlas_figure(z["atlas"], scale=max(1, 128 // cfg.side))
            pics.append(gio.write_png(reports / f"channels_{r.id}.png", fig))
        for p in pics:
            mlflow.log_artifact(str(p), artifact_path="atlas_channels")
    print(f"atlas: {len(index)} atlases [16, {cfg.side}, {cfg.side}], {len(q)} quarantined, {seconds:.1f} s "
          f"on {device} -> {out}")
    if len(accepted) and not len(index):
        raise StageError(f"atlas: no atlas could be built; reasons in {out / 'quarantine.csv'}")


def atlas_stamp(cfg) -> str:
    """Hash of the atlas settings and code: a finished atlas is reused only when both match."""
    import dataclasses
    import hashlib
    import json

    from gaussian_atlas import assign, atlas

    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for mod in (atlas, assign):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def _row(r, rel: Path, z, captions: dict) -> dict:
    return {"id": r.id, "caption": captions.get(r.id, ""), "path": rel.as_posix(), "shard": r.shard,
            "center_x": float(z["center"][0]), "center_y": float(z["center"][1]), "center_z": float(z["center"][2]),
            "scale": float(z["scale"]), "n_real": int(z["n_real"]), "n_input": int(z["n_input"])}


if __name__ == "__main__":
    main_guard(main)
