"""`gatlas`: the library's command line (the DVC stages live in stages/, the flow in flows/).

Subcommands grow as stages land; `gatlas <command> --help` describes each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import resolve_device, telemetry_off

EPILOG = """\
the pipeline (from the repository root):
  make demo                          set up and run every stage on the built-in dataset
  dvc repro [STAGE]                  run the DVC pipeline (or one stage) with params.yaml
  python -m flows.pipeline run       the same through Prefect, with an MLflow parent run
  make ui                            MLflow UI: http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning
"""


def _views_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=int, default=24, help="views per object (default: %(default)s)")
    p.add_argument("--ring", type=int, default=16, help="views on the 20-degree elevation ring (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels (default: %(default)s)")
    p.add_argument("--supersample", type=int, default=2, help="rays per pixel side (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the camera placement (default: %(default)s)")


def _render_cfg(args: argparse.Namespace):
    from .cameras import ViewConfig
    from .meshrender import RenderConfig

    views = ViewConfig(n_views=args.views, n_ring=min(args.ring, args.views), resolution=args.resolution)
    return RenderConfig(views=views, supersample=args.supersample)


def cmd_render_mesh(args: argparse.Namespace) -> None:
    from .meshrender import render_mesh_file

    out = render_mesh_file(args.mesh, args.out, caption=args.caption, cfg=_render_cfg(args), seed=args.seed,
                           object_id=args.id, up_axis=args.up_axis)
    print(f"rendered {args.mesh} -> {out} (NeRF-synthetic layout: transforms.json, images/, surface_samples.npz)")


def cmd_procedural(args: argparse.Namespace) -> None:
    from .procedural import ProceduralConfig, generate_dataset

    cfg = ProceduralConfig(n_objects=args.n_objects, seed=args.seed, workers=args.workers,
                           composition_fraction=args.composition_fraction, render=_render_cfg(args))
    summary = generate_dataset(cfg, Path(args.out), progress=True)
    print(f"{summary['n_objects']} objects in {args.out} ({summary['n_rendered']} rendered now)")


def cmd_ingest(args: argparse.Namespace) -> None:
    from .data import IngestConfig, ingest

    cfg = IngestConfig(source=args.source, captions=args.captions, layout=args.layout, min_views=args.min_views,
                       max_quarantine_fraction=args.max_quarantine_fraction)
    s = ingest(cfg, Path(args.out), docs_dir=Path(args.out) / "data_docs" if args.docs else None, progress=True)
    print(f"{s['n_accepted']}/{s['n_found']} accepted, {s['n_quarantined']} quarantined "
          f"({Path(args.out) / 'quarantine.csv'}); manifest: {Path(args.out) / 'manifest.parquet'}")
    if s["quarantined_fraction"] > cfg.max_quarantine_fraction:
        raise SystemExit(f"error: {s['quarantined_fraction']:.1%} quarantined, above {cfg.max_quarantine_fraction:.1%}")


def cmd_atlas(args: argparse.Namespace) -> None:
    from .atlas import AtlasConfig, write_atlases
    from .data import read_captions
    from .gaussians import read_gaussianverse_ply, read_ply
    from .reports import write_atlas_tables

    root = Path(args.plys)
    if not root.is_dir():
        raise FileNotFoundError(f"PLY folder does not exist: {root}")
    if args.layout == "gaussianverse":  # <id>/point_cloud.ply (the GaussianVerse release)
        plys = sorted(root.glob("**/point_cloud.ply"))
        ids = [p.parent.name for p in plys]
    else:  # <id>.ply, any depth (e.g. the fit stage's data/fits/objects)
        plys = sorted(root.glob("**/*.ply"))
        ids = [p.stem for p in plys]
    if not plys:
        raise FileNotFoundError(f"no {'point_cloud.ply' if args.layout == 'gaussianverse' else '*.ply'} under {root}")
    captions = read_captions(args.captions)[0] if args.captions else {}
    items = [{"id": i, "src": str(p), "shard": f"shard-{k // 1000:05d}", "caption": captions.get(i, "")}
             for k, (i, p) in enumerate(zip(ids, plys))]
    cfg = AtlasConfig(side=args.side, method=args.method, cache_dir=args.cache_dir)
    reader = read_gaussianverse_ply if args.layout == "gaussianverse" else read_ply
    rows, quarantine = write_atlases(items, cfg, args.out, reader=reader, device=args.device,
                                     use_gs2sphere=args.use_gs2sphere)
    out = Path(args.out)
    write_atlas_tables(out, rows, quarantine)  # the atlas stage's index.parquet and quarantine.csv
    print(f"{len(rows)} atlases [16, {args.side}, {args.side}] in {out}, {len(quarantine)} quarantined "
          f"({out / 'quarantine.csv'}); next: python -m stages.normalize --atlas {out}")


def cmd_metrics(args: argparse.Namespace) -> None:
    from .reports import metrics_summary

    print(metrics_summary(args.dir, args.all))


def cmd_generate(args: argparse.Namespace) -> None:
    from .evaluate import slug
    from .reports import write_sample
    from .sample import SampleConfig, generate, load_atlas_model, turntable

    device = resolve_device(args.device)
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance, seed=args.seed, frames=args.frames,
                       resolution=args.resolution, batch_size=args.batch_size, compile=args.compile)
    model = load_atlas_model(args.model, device=device)
    atlases, g, seeds = generate(model, args.prompts, cfg, progress=True)
    frames = turntable(g, cfg)  # [B, F, H, W, 3]
    out = Path(args.out)
    used: dict[str, int] = {}
    for i, prompt in enumerate(args.prompts):
        name = slug(prompt)
        used[name] = used.get(name, 0) + 1
        name = name if used[name] == 1 else f"{name}-{used[name]}"
        ply, gif, png = write_sample(g._map(lambda t, i=i: t[i]), frames[i], atlases[i], ply=out / f"{name}.ply",
                                     gif=out / f"{name}.gif", png=out / f"{name}_atlas.png")  # as the evaluate stage
        print(f"{prompt!r} (seed {seeds[i]}):\n  {ply}\n  {gif}\n  {png}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="gatlas", description="Gaussian Atlas: text -> 3D Gaussian splats via a "
                                 "fine-tuned 2D diffusion model (library commands).", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"gatlas {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("render-mesh", help="render any mesh (OBJ/GLB/PLY...) into a multi-view render folder",
                       description="Render a mesh trimesh can load (vertex colours or a texture are used) into "
                       "the NeRF-synthetic layout the ingest stage reads: RGBA views around the object "
                       "(a ring plus random elevations), cameras in transforms.json (OpenGL c2w, Z-up world), "
                       "mesh surface samples, and object.json with the caption.")
    p.add_argument("mesh", help="mesh file")
    p.add_argument("--caption", required=True, help='text describing the object, e.g. "a wooden chair"')
    p.add_argument("--out", required=True, help="output folder (one object)")
    p.add_argument("--id", default=None, help="object id (default: the mesh file's stem)")
    p.add_argument("--up-axis", choices=["x", "y", "z", "-x", "-y", "-z"], default=None,
                   help="the mesh's up axis (default: z; GLB/GLTF files are y-up by spec)")
    _views_args(p)
    p.set_defaults(fn=cmd_render_mesh)

    p = sub.add_parser("procedural", help="render the built-in procedural dataset into a folder",
                       description="Primitives (cube, sphere, cylinder, cone, torus, capsule, pyramid, ...) in named "
                       "colours and two-part compositions, each with a caption.")
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--n-objects", type=int, default=48, help="objects (default: %(default)s)")
    p.add_argument("--composition-fraction", type=float, default=0.25, help="share of two-part objects")
    p.add_argument("--workers", type=int, default=2, help="render processes (default: %(default)s)")
    _views_args(p)
    p.set_defaults(fn=cmd_procedural)

    p = sub.add_parser("ingest", help="validate a render dataset and write the internal layout + manifest",
                       description="Library-level ingest (no MLflow): NeRF-synthetic or G-Objaverse layout in, "
                       "sharded internal layout, manifest.parquet and quarantine.csv out.")
    p.add_argument("source", help="render dataset folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--captions", default=None, help="captions (jsonl or csv with id, caption)")
    p.add_argument("--layout", choices=["auto", "nerf", "gobjaverse"], default="auto")
    p.add_argument("--min-views", type=int, default=8)
    p.add_argument("--max-quarantine-fraction", type=float, default=0.2)
    p.add_argument("--docs", action="store_true", help="also build great-expectations data docs in OUT/data_docs")
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("atlas", help="build Gaussian Atlases from a folder of PLYs (e.g. GaussianVerse fittings)",
                       description="Turn 3DGS PLYs into atlases [16, S, S] in the atlas stage's layout "
                       "(atlases/<shard>/<id>.npz, index.parquet, quarantine.csv). With --layout gaussianverse it "
                       "reads the GaussianVerse release (<id>/point_cloud.ply, SH degree 3, properties by name as the "
                       "dataset authors' loader reads them), so users of that dataset skip fitting.")
    p.add_argument("plys", help="folder of PLYs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layout", choices=["inria", "gaussianverse"], default="inria")
    p.add_argument("--captions", default=None, help="captions (jsonl or csv with id, caption)")
    p.add_argument("--side", type=int, default=128, help="atlas side, N = side^2 (default: %(default)s, the paper's)")
    p.add_argument("--method", default="auto", help="assignment solver: auto|scipy|emd|auction (default: auto)")
    p.add_argument("--cache-dir", default="data/atlas_cache", help="where the sphere->grid index is cached")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--use-gs2sphere", action="store_true",
                   help="use a gs2sphere.npy next to each PLY as its sphere assignment (must index our sphere)")
    p.set_defaults(fn=cmd_atlas)

    p = sub.add_parser("generate", help="text -> 3D Gaussians with a trained model: PLY + turntable GIF + atlas picture",
                       description="Sample Gaussian Atlases for the prompts with DPM-Solver++ and classifier-free "
                       "guidance, decode them into 3D Gaussians and write, per prompt, OUT/<slug>.ply (INRIA 3DGS "
                       "layout, SH degree 0, object in the unit ball, +Z up), OUT/<slug>.gif (a turntable) and "
                       "OUT/<slug>_atlas.png (the atlas channels: offset, albedo, opacity, scale, rotation). "
                       "Prompt i uses seed SEED + i, so a result is reproduced by its prompt and seed.")
    p.add_argument("prompts", nargs="+", help='one or more prompts, e.g. "a red torus"')
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="models/atlas-unet/model",
                   help="trained model folder, the train stage's <out>/model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance (default: %(default)s, "
                   "the paper's; 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (default: %(default)s)")
    p.add_argument("--frames", type=int, default=24, help="turntable frames (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=128, help="turntable image side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per UNet batch (default: %(default)s)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "default", "max-autotune-no-cudagraphs"],
                   help="torch.compile of the UNet (auto: on CUDA). On an H200 it costs ~70 s once per process and "
                        "saves ~0.24 s per prompt: off is quicker below a few hundred prompts (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("metrics", help="the stages' metrics/*.json in a few lines (dvc metrics show is one wide table)",
                       description="Per stage (pipeline order) its top-level numbers; for evaluate, both-right "
                       "accuracy with its 95 % interval per source (generated, ceiling, floor) and split.")
    p.add_argument("--dir", default="metrics", help="metrics folder (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="every key, flattened, one per line")
    p.set_defaults(fn=cmd_metrics)
    return ap


def main(argv: list[str] | None = None) -> None:
    telemetry_off()
    args = build_parser().parse_args(argv)
    from .data import DatasetError

    try:
        args.fn(args)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
