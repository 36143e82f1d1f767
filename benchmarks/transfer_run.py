"""The 2D-prior transfer experiment (paper Sec. 6.2, Fig. 8) on one GPU: repurposed vs from scratch.

    python benchmarks/transfer_run.py data  --out W      # 3D set with a held-out split -> fits -> atlases -> statistics
    python benchmarks/transfer_run.py prior --out W      # 2D images (every pair, held-out ones too) -> the 2D prior
    python benchmarks/transfer_run.py arm   --out W --arm repurposed --seed 0   # train + score at each snapshot
    python benchmarks/transfer_run.py arm   --out W --arm scratch --seed 0
    python benchmarks/transfer_run.py report --out W --docs docs/paper_claims   # table, loss plot, sheets

The layout ablation of issue #14 (``atlas.layout``) runs on the same folder: ``data --layouts ot random
morton`` also writes the control layouts' atlases (``W/atlas-<layout>/``, same fits, same packing, other
pixels) and their statistics (``W/stats-<layout>.npz``), and ``arm --layout random`` trains on them
(``W/arms/<arm>-<layout>-s<seed>``); ``report`` then also prints each layout's difference to ``ot``.

``data`` and ``prior`` are independent (run them side by side); the arms need both. The same library
calls as the DVC stages (``generate_dataset`` with ``generate.holdout``, ``fit_chunk``,
``write_atlases``, ``pretrain2d``, ``train`` with ``snapshots``, ``evaluate``), without DVC, MLflow or
Prefect, which a bare GPU machine does not have (``benchmarks/log_transfer_run.py`` logs the result
into MLflow afterwards, one run per arm and seed).

The design, fixed before the run (the defaults below; every invocation's arguments are kept in
``W/<phase>.json``):

- **arms**: *repurposed* = ``train.model.pretrained`` is the 2D prior (UNet widened 4 -> 16 channels
  by the paper's rule, its text encoder frozen); *scratch* = the same UNet and text encoder from
  random init (the text encoder trained, as the from-config default does). Same atlases, steps,
  batch, learning-rate schedule, caption dropout, EMA and seeds; one process per arm and seed, all
  started together on the one GPU, so they share it alike.
- **metric**: the evaluate stage's procedural scores (colour / shape / both right) of
  ``--eval-samples`` samples per prompt for ``--eval-prompts`` prompts (seen singles, held-out singles,
  stacks alternately seen and held out), 95 % bootstrap intervals over prompts x samples, at the
  ``--snapshots`` fractions of the steps; ceiling (fits with the prompt as caption; for held-out
  prompts the ceiling objects rendered for them) and floor (random atlases) beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prebuilt import use_prebuilt_gsplat  # noqa: E402

use_prebuilt_gsplat()

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ARMS = ("repurposed", "scratch")
LAYOUTS = ("ot", "random", "morton")  # gaussian_atlas.atlas.LAYOUTS (not imported here: --help stays fast)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["data", "prior", "arm", "report"])
    ap.add_argument("--out", required=True, help="working folder shared by the phases")
    g = ap.add_argument_group("3D data (phase data)")
    g.add_argument("--objects", type=int, default=512, help="3D training objects")
    g.add_argument("--holdout", type=int, nargs=2, default=[12, 4], metavar=("SINGLES", "STACKS"),
                   help="held-out shape x colour pairs and stacks (generate.holdout)")
    g.add_argument("--ceiling-per-prompt", type=int, default=2, help="ceiling objects per held-out prompt")
    g.add_argument("--workers", type=int, default=8, help="render processes")
    g.add_argument("--fit-steps", type=int, default=300)
    g.add_argument("--fit-batch", type=int, default=64)
    g.add_argument("--tau", type=int, default=4096)
    g.add_argument("--side", type=int, default=64, help="atlas side = 2D image side")
    g.add_argument("--psnr-floor", type=float, default=20.0, help="prune_check's held-out PSNR floor (dB)")
    g.add_argument("--layouts", nargs="+", default=["ot"], choices=list(LAYOUTS),
                   help="atlas layouts to build (atlas.layout; the controls of issue #14 beside the paper's ot)")
    g = ap.add_argument_group("2D prior (phase prior)")
    g.add_argument("--prior-objects", type=int, default=1080, help="2D objects (singles cycle over all 108 pairs)")
    g.add_argument("--prior-views", type=int, default=8, help="images per 2D object")
    g.add_argument("--prior-seed", type=int, default=1000, help="master seed of the 2D objects (3D: 0)")
    g.add_argument("--prior-steps", type=int, default=1500)
    g.add_argument("--prior-lr", type=float, default=2e-4)
    g.add_argument("--wait-for", nargs="+", default=None, metavar="PATH",
                   help="train the prior only once every PATH exists (e.g. W/fits/metrics.parquet): the packed fit is "
                        "launch-bound and ran 4x slower beside the prior's training on one H200 (69 vs 277 objects/min)")
    g = ap.add_argument_group("arms (phase arm)")
    g.add_argument("--arm", choices=ARMS)
    g.add_argument("--seed", type=int, default=0, help="training seed of the arm")
    g.add_argument("--layout", default=None, choices=list(LAYOUTS),
                   help="train on this layout's atlases (data --layouts); named <arm>-<layout>-s<seed>. "
                        "Default: ot, named <arm>-s<seed> (the transfer experiment)")
    g.add_argument("--size", default="small", choices=["tiny", "small", "sd"])
    g.add_argument("--steps", type=int, default=1200)
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--snapshots", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="fractions of --steps")
    g.add_argument("--max-minutes", type=float, default=0.0, help="safety stop of an arm's training (0 = none)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-prompts", type=int, nargs=3, default=[12, 12, 4], metavar=("SEEN", "HELD_OUT", "STACKS"))
    g.add_argument("--eval-samples", type=int, default=4, help="samples (seeds) per prompt")
    g.add_argument("--eval-views", type=int, default=8)
    g.add_argument("--eval-resolution", type=int, default=128)
    g.add_argument("--sample-steps", type=int, default=20)
    g = ap.add_argument_group("report")
    g.add_argument("--docs", default="docs/paper_claims", help="folder for the plot and sheets (phase report)")
    return ap


def _atlas_cfg(args, layout: str = "ot"):
    from gaussian_atlas.atlas import AtlasConfig

    return AtlasConfig(side=args.side, method="auto", cache_dir=str(Path(args.out) / "atlas_cache"), layout=layout)


def _layout_paths(root: Path, layout: str | None) -> tuple[Path, Path]:
    """Atlas folder and statistics of a layout: ``atlas/``, ``stats.npz`` for ot (the transfer experiment's)."""
    if layout in (None, "ot"):
        return root / "atlas", root / "stats.npz"
    return root / f"atlas-{layout}", root / f"stats-{layout}.npz"


def build_layout(root: Path, acfg, layout: str) -> dict:
    """The atlases of the accepted fits under a control layout (same fits, same packing, other pixels) and the
    statistics of its training split; returns the layout's coherence summary."""
    import pandas as pd
    from gpu_run import atlases_and_stats

    t = time.perf_counter()
    base = pd.read_parquet(root / "atlas" / "index.parquet")  # the ot atlases: which fits were accepted
    fits = pd.read_parquet(root / "fits" / "metrics.parquet").set_index("id")
    items = [{"id": r.id, "shard": "all", "src": str(root / "fits" / fits.loc[r.id, "ply"]), "caption": r.caption,
              "split": r.split} for r in base.itertuples(index=False)]
    index, quarantine = atlases_and_stats(items, acfg, *_layout_paths(root, layout))
    return {"n": len(index), "quarantined": len(quarantine), "seconds": time.perf_counter() - t,
            "coherence_mean": float(index["coherence"].mean()), "distance_ratio_median":
                float(index["distance_ratio"].median())}


def _record(root: Path, name: str, payload: dict) -> None:
    (root / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))


def phase_data(args, root: Path) -> None:
    from gpu_run import data_phase

    summary: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}
    ns = Namespace(objects=args.objects, workers=args.workers, fit_steps=args.fit_steps, tau=args.tau,
                   fit_resolution=0, fit_batch=args.fit_batch, psnr_floor=args.psnr_floor, wait_for=None,
                   holdout_singles=args.holdout[0], holdout_stacks=args.holdout[1],
                   ceiling_per_prompt=args.ceiling_per_prompt)
    data_phase(ns, root, _atlas_cfg(args), summary, lambda: _record(root, "data", summary))
    import pandas as pd

    ot = pd.read_parquet(root / "atlas" / "index.parquet")
    summary["layouts"] = {"ot": {"n": len(ot), "coherence_mean": float(ot["coherence"].mean()),
                                 "distance_ratio_median": float(ot["distance_ratio"].median())}}
    for layout in [x for x in args.layouts if x != "ot"]:
        summary["layouts"][layout] = build_layout(root, _atlas_cfg(args, layout), layout)
        log(f"layout {layout}: {summary['layouts'][layout]}")
        _record(root, "data", summary)
    log(f"layouts: " + ", ".join(f"{k} coherence {v['coherence_mean']:.4f}" for k, v in summary["layouts"].items()))
    _record(root, "data", summary)


def phase_prior(args, root: Path) -> None:
    from gaussian_atlas import io as gio
    from gaussian_atlas.pretrain2d import Prior2dData, image_sheet, load_images, pretrain2d, render_prior_images, sample_images
    from gaussian_atlas.procedural import HoldoutConfig, ProceduralConfig, _caption, _part, holdout_sets

    t = time.perf_counter()
    dcfg = Prior2dData(n_objects=args.prior_objects, views=args.prior_views, composition_fraction=0.25,
                       seed=args.prior_seed, supersample=2, workers=args.workers)
    render_prior_images(dcfg, args.side, root / "prior_images", progress=False)
    images, captions = load_images(root / "prior_images")
    t_render = time.perf_counter() - t
    log(f"prior: {len(images)} images of {args.prior_objects} objects in {t_render:.0f} s")
    if args.wait_for:
        while not all(Path(p).exists() for p in args.wait_for):
            time.sleep(2)
        log(f"prior: {', '.join(args.wait_for)} exist, training")
    cfg = _train_cfg(args, pretrained=None, channels=4, steps=args.prior_steps, lr=args.prior_lr, seed=0,
                     snapshots=())
    hist = (root / "prior_history.jsonl").open("a")
    s = pretrain2d(cfg, images, captions, root / "prior",
                   log=lambda k, m: (hist.write(json.dumps({"step": k, **m}) + "\n"), hist.flush()))
    hist.close()
    held, _ = holdout_sets(ProceduralConfig(seed=0, holdout=HoldoutConfig(singles=args.holdout[0],
                                                                          compositions=args.holdout[1])))
    prompts = [_caption([_part(sh, c)]) for sh, c in held]
    pics = sample_images(root / "prior" / "model", prompts, list(range(len(prompts))), steps=args.sample_steps,
                         device=DEV)
    gio.write_png(root / "prior_samples.png", image_sheet(pics, prompts, ncols=6))
    _record(root, "prior", {"args": vars(args), "render_s": t_render, "n_images": len(images), **s,
                            "held_out_prompts_sampled": prompts})
    log(f"prior: {s['step']} steps, {s['samples_per_second']:.0f} samples/s, last v-loss {s.get('last_loss_v')}")


def _train_cfg(args, *, pretrained, channels: int, steps: int, lr: float, seed: int, snapshots):
    from gaussian_atlas.model import ModelConfig
    from gaussian_atlas.train import TrainConfig

    return TrainConfig(model=ModelConfig(pretrained=pretrained, size=args.size, channels=channels,
                                         sample_size=args.side, max_length=16),
                       steps=steps, batch_size=args.batch, lr=lr, lr_warmup=args.warmup, ema_decay=0.999,
                       lambda_rgb=0.1 if channels == 16 else 0.0, lambda_mask=0.1 if channels == 16 else 0.0,
                       render_every=4, render_resolution=32, checkpoint_every=max(steps // 4, 1), keep_checkpoints=1,
                       log_every=25, max_minutes=args.max_minutes, seed=seed, snapshots=tuple(snapshots))


def phase_arm(args, root: Path) -> None:
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.evaluate import EvaluateConfig, ceiling_atlases, evaluate, index_prompts
    from gaussian_atlas.sample import SampleConfig, load_atlas_model, sample_sheet
    from gaussian_atlas.train import load_train_data, package_model, train

    if args.arm is None:
        raise SystemExit("phase arm needs --arm repurposed|scratch")
    name = f"{args.arm}-s{args.seed}" if args.layout is None else f"{args.arm}-{args.layout}-s{args.seed}"
    out = root / "arms" / name
    out.mkdir(parents=True, exist_ok=True)
    acfg = _atlas_cfg(args, args.layout or "ot")
    atlas_dir, stats_path = _layout_paths(root, args.layout)
    snaps = sorted({max(1, round(f * args.steps)) for f in args.snapshots})
    prior = root / "prior" / "model"
    if args.arm == "repurposed" and not (prior / "unet").is_dir():
        raise SystemExit(f"no 2D prior at {prior}: run the prior phase first")
    cfg = _train_cfg(args, pretrained=str(prior) if args.arm == "repurposed" else None, channels=16,
                     steps=args.steps, lr=args.lr, seed=args.seed, snapshots=snaps)
    data = load_train_data(atlas_dir, stats_path, root / "procedural", acfg, render_resolution=32)
    hist = (out / "history.jsonl").open("a")
    t = time.perf_counter()
    s = train(cfg, data, acfg, out / "train",
              log=lambda k, m: (hist.write(json.dumps({"step": k, "time": time.time(), **m}) + "\n"), hist.flush()))
    hist.close()
    train_s = time.perf_counter() - t
    log(f"{name}: {s['step']} steps in {train_s:.0f} s ({s['samples_per_second']:.0f} samples/s)")

    index = pd.read_parquet(atlas_dir / "index.parquet")
    ecfg = EvaluateConfig(n_seen=args.eval_prompts[0], n_held_out=args.eval_prompts[1],
                          n_compositions=args.eval_prompts[2], samples_per_prompt=args.eval_samples,
                          n_views=args.eval_views, resolution=args.eval_resolution,
                          sample=SampleConfig(steps=args.sample_steps, guidance=3.5, batch_size=32))
    specs = index_prompts(index, ecfg)
    ceiling = ceiling_atlases(index, atlas_dir, specs, limit=ecfg.samples_per_prompt)
    # a rerun (e.g. after the --max-minutes safety stop, resumed to --steps) scores only the snapshots not yet scored
    prev = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    scores = {int(k): v for k, v in (prev.get("scores") or {}).items()}
    invocations = [*prev.get("invocations", []), {"argv": sys.argv[1:], "train": s}]
    earlier = None  # the first evaluation of this process: later snapshots reuse its palettes, ceiling and floor
    for step in snaps:
        snap = out / "train" / "snapshots" / f"step-{step}"
        if step in scores and (out / f"scores_step{step}.csv").exists():
            continue
        if not (snap / "unet").is_dir():
            log(f"{name}: no snapshot at step {step} (training stopped at {s['step']})")
            continue
        package_model(snap, stats_path, acfg)
        model = load_atlas_model(snap, DEV)
        ev = evaluate(model, specs, ecfg, ceiling, progress=True, reuse=earlier)
        earlier = earlier or ev
        log(f"{name} step {step}: evaluate seconds {ev.metrics['seconds']}")
        S = ecfg.samples_per_prompt
        pd.DataFrame(ev.rows).to_csv(out / f"scores_step{step}.csv", index=False)
        # the first sample of each prompt, 2 of its views (the report puts arms and steps side by side)
        first = [i * S for i in range(len(specs))]
        np.savez_compressed(out / f"views_step{step}.npz", views=ev.views["generated"][first][:, :2])
        if step == snaps[-1]:
            gio.write_png(out / f"sheet_step{step}.png",
                          sample_sheet(ev.views["generated"][first][:, :4],
                                       [("[held out] " if sp.held_out else "") + sp.prompt for sp in specs]))
        scores[step] = {src: ev.metrics.get(src) for src in ("generated", "ceiling", "floor")}
        g = ev.metrics["generated"]
        log(f"{name} step {step}: both seen {g['seen']['both_accuracy']} {g['seen']['both_accuracy_ci95']}, "
            f"held-out {g['held_out']['both_accuracy']} {g['held_out']['both_accuracy_ci95']}")
        _record(out, "result", {"args": vars(args), "arm": args.arm, "seed": args.seed, "layout": args.layout or "ot",
                                "train": s,
                                "train_s": train_s + float(prev.get("train_s") or 0.0),
                                "invocations": invocations, "snapshots": snaps, "scores": scores,
                                "prompts": [vars(sp) for sp in specs], "evaluate_config": ecfg.__dict__ | {
                                    "sample": vars(ecfg.sample)}})
        del model
        torch.cuda.empty_cache() if DEV == "cuda" else None
    log(f"{name}: done")


def phase_report(args, root: Path) -> None:
    """The table of docs/paper_claims.md (printed as markdown), the loss plot and the side-by-side sheet."""
    from report_transfer import report

    report(root, Path(args.docs))


def main() -> None:
    args = parser().parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    {"data": phase_data, "prior": phase_prior, "arm": phase_arm, "report": phase_report}[args.phase](args, root)


if __name__ == "__main__":
    main()
