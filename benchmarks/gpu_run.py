"""The real GPU run of issue #5: generate -> fit -> atlas -> normalize -> train -> sample, on one GPU.

    python benchmarks/gpu_run.py --out .gpu_run --objects 512 --train-minutes 15
    python benchmarks/gpu_run.py --out .gpu_run --only sample      # previews/turntables of the saved model

The same library calls as the DVC stages (generate_dataset, fit_chunk, write_atlases,
RunningStats, load_train_data, train, sample), without DVC, MLflow, Prefect or
great-expectations, none of which the GPU machine has: the generator's output is fitted
directly (the ingest suite and the prune_check gate need great-expectations; the gate's PSNR
floor is applied here by hand). Every phase is resumable (the library's own resume logic),
so re-running the command continues where it stopped.

Writes under ``--out``: ``procedural/``, ``fits/`` (+ ``fits/metrics.parquet``), ``atlas/``,
``stats.npz``, ``train/`` (checkpoints, ``model/``), ``history.jsonl`` (one line per logged
step), ``previews/step_*.png``, ``samples/`` (turntable GIFs + a sheet), ``evaluate/`` (the
evaluate stage's scores for built-in prompts: ``evaluate.json``, ``scores.csv``, ``views.png``), ``summary.json``
(parameters, timings, figures). ``benchmarks/log_gpu_run.py`` logs the history and
pictures to MLflow afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prebuilt import use_prebuilt_gsplat  # noqa: E402  (GSPLAT_PREBUILT=...gsplat_cuda.so skips the JIT build)

use_prebuilt_gsplat()


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu_run")
    ap.add_argument("--objects", type=int, default=512)
    ap.add_argument("--workers", type=int, default=14, help="render processes")
    ap.add_argument("--fit-steps", type=int, default=500)
    ap.add_argument("--tau", type=int, default=4096)
    ap.add_argument("--side", type=int, default=64, help="atlas side (N = side^2)")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "sd"], help="UNet size")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--train-minutes", type=float, default=15.0)
    ap.add_argument("--train-until", type=float, default=None, metavar="EPOCH",
                    help="stop training by this wall-clock time (seconds since the epoch) whatever --train-minutes "
                         "says, so that the samples are made inside a fixed machine lease")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--sample-every", type=int, default=1000, help="preview samples every k steps")
    ap.add_argument("--fit-batch", type=int, default=32, help="objects fitted together")
    ap.add_argument("--fit-resolution", type=int, default=0, help="fit at this image side (0 = as rendered, 128)")
    ap.add_argument("--prompts", nargs="+", default=None, help="prompts of the final samples (default: 8 built-in)")
    ap.add_argument("--psnr-floor", type=float, default=20.0, help="prune_check's held-out PSNR floor (dB)")
    ap.add_argument("--eval-prompts", type=int, nargs=3, default=[12, 8, 4], metavar=("SEEN", "HELD_OUT", "COMPOSITIONS"),
                    help="built-in evaluate prompts (seen single captions, held-out combinations, stacks)")
    ap.add_argument("--eval-views", type=int, default=8, help="random views per evaluate prompt")
    ap.add_argument("--eval-samples", type=int, default=1, help="samples (seeds) per evaluate prompt")
    ap.add_argument("--only", choices=["data", "train", "sample", "evaluate"], default=None)
    ap.add_argument("--wait-for", default=None, metavar="FILE",
                    help="after generating (CPU), wait until FILE exists before using the GPU (e.g. a benchmark "
                         "sharing the machine)")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["args"] = vars(args)  # this invocation's; every invocation's are kept under "invocations"
    summary.setdefault("invocations", []).append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **vars(args)})
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def save() -> None:
        summary_path.write_text(json.dumps(summary, indent=2, default=str))

    from gaussian_atlas.atlas import AtlasConfig

    acfg = AtlasConfig(side=args.side, method="auto", cache_dir=str(root / "atlas_cache"))
    if args.only in (None, "data"):
        data_phase(args, root, acfg, summary, save)
    if args.only in (None, "train"):
        train_phase(args, root, acfg, summary, save)
    if args.only in (None, "sample"):
        sample_phase(args, root, summary, save)
    if args.only in (None, "evaluate"):
        evaluate_phase(args, root, summary, save)
    save()
    log("done")


def data_phase(args, root: Path, acfg, summary: dict, save) -> None:
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import sphere_to_grid
    from gaussian_atlas.fit import DensifyConfig, FitConfig, fit_chunk
    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import HoldoutConfig, ProceduralConfig, generate_dataset

    # 1. generate (CPU processes); held-out prompts (if any) get ceiling objects of split "ceiling"
    t = time.perf_counter()
    holdout = HoldoutConfig(singles=getattr(args, "holdout_singles", 0), compositions=getattr(args, "holdout_stacks", 0),
                            ceiling_per_prompt=getattr(args, "ceiling_per_prompt", 1))
    pcfg = ProceduralConfig(n_objects=args.objects, composition_fraction=0.25, seed=0, workers=args.workers,
                            render=RenderConfig(supersample=2, n_surface_samples=4096), holdout=holdout)
    gen = generate_dataset(pcfg, root / "procedural", progress=False)
    summary["generate_s"] = time.perf_counter() - t
    log(f"generate: {gen['n_objects']} objects ({gen['n_rendered']} rendered now) in {summary['generate_s']:.0f} s")
    caps, splits = {}, {}
    for line in (root / "procedural" / "captions.jsonl").read_text().splitlines():
        r = json.loads(line)
        caps[r["id"]], splits[r["id"]] = r["caption"], r.get("split", "train")
    ids = sorted(caps)
    items = [{"id": i, "path": f"objects/{i}", "shard": "all"} for i in ids]
    gio.write_parquet(root / "procedural" / "manifest.parquet",  # what load_train_data reads; records the split
                      pd.DataFrame({"id": ids, "path": [f"objects/{i}" for i in ids], "caption": [caps[i] for i in ids],
                                    "split": [splits[i] for i in ids]}))

    if args.wait_for:
        while not Path(args.wait_for).exists():
            time.sleep(2)
        log(f"{args.wait_for} exists: the GPU is ours")
    # 2. fit (GPU, objects packed 32 at a time)
    t = time.perf_counter()
    fcfg = FitConfig(steps=args.fit_steps, tau=args.tau, init_points=2000, views_per_step=4,
                     resolution=args.fit_resolution,
                     batch_objects=args.fit_batch, densify=DensifyConfig(refine_start_iter=100, refine_stop_iter=int(
                         0.8 * args.fit_steps), refine_every=100, reset_every=100000))
    rows = fit_chunk(items, root / "procedural", root / "fits", fcfg, device=DEV, progress=True)
    table = pd.DataFrame(rows)
    gio.write_parquet(root / "fits" / "metrics.parquet", table)
    ok = table[(table["status"] == "ok") & (table["psnr"] >= args.psnr_floor)]  # prune_check's PSNR floor
    if ok.empty:
        raise SystemExit(f"fit: none of {len(table)} fits reached {args.psnr_floor} dB held-out PSNR; see "
                         f"{root / 'fits' / 'metrics.parquet'}")
    summary["fit_s"] = time.perf_counter() - t
    summary["fit"] = {"n": len(table), "n_ok": len(ok), "psnr_mean": float(ok["psnr"].mean()),
                      "psnr_min": float(ok["psnr"].min()), "n_gaussians_mean": float(ok["n_gaussians"].mean()),
                      "objects_per_minute": 60 * len(table) / summary["fit_s"], "config": asdict(fcfg)}
    log(f"fit: {len(ok)}/{len(table)} accepted, mean PSNR {summary['fit']['psnr_mean']:.2f} dB, "
        f"{summary['fit_s']:.0f} s")
    save()

    # 3. atlas (GPU solver) and 4. normalize
    t = time.perf_counter()
    sphere_to_grid(acfg.side, acfg.method, acfg.cache_dir, device=DEV)
    items = [{"id": r.id, "shard": "all", "src": str(root / "fits" / r.ply), "caption": caps[r.id],
              "split": splits[r.id]} for r in ok.itertuples(index=False)]
    index, quarantine = atlases_and_stats(items, acfg, root / "atlas", root / "stats.npz")
    summary["atlas_s"] = time.perf_counter() - t
    summary["atlas"] = {"n": len(index), "quarantined": len(quarantine), "side": acfg.side,
                        "n_ceiling": int((index["split"] == "ceiling").sum())}
    log(f"atlas + normalize: {len(index)} atlases, {len(quarantine)} quarantined, {summary['atlas_s']:.0f} s")
    save()


def atlases_and_stats(items: list[dict], acfg, atlas_dir: Path, stats_path: Path, *, device: str | None = None,
                      timings: dict | None = None, progress: bool = True, batch: int = 16):
    """Atlases of ``items`` (``write_atlases``) with their ``index.parquet``, and the pixel statistics of the
    training split only at ``stats_path``; returns (index, quarantine). ``device``: where the assignment runs
    (default: this machine's GPU, else the CPU); ``batch``: objects per batched assignment; ``timings``, when
    given, receives the seconds of the atlases (``atlas_s``; ``atlas_parts``: write_atlases' split of them) and of the
    statistics (``normalize_s``)."""
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import training_rows, write_atlases
    from gaussian_atlas.normalize import RunningStats

    t = time.perf_counter()
    parts: dict[str, float] = {}
    arows, quarantine = write_atlases(items, acfg, atlas_dir, device=device or DEV, batch=batch, progress=progress,
                                      timings=parts)
    index = pd.DataFrame(arows).sort_values("id").reset_index(drop=True)
    gio.write_parquet(atlas_dir / "index.parquet", index)
    t_stats = time.perf_counter()
    stats = RunningStats()
    for p in training_rows(index)["path"]:
        with np.load(atlas_dir / p) as z:
            stats.update(z["atlas"][None])
    stats.save(stats_path)
    if timings is not None:
        timings.update(atlas_s=t_stats - t, normalize_s=time.perf_counter() - t_stats, atlas_parts=parts)
    return index, quarantine


def train_phase(args, root: Path, acfg, summary: dict, save) -> None:
    from gaussian_atlas import io as gio
    from gaussian_atlas.config import to_dict
    from gaussian_atlas.model import ModelConfig
    from gaussian_atlas.train import TrainConfig, load_train_data, train

    minutes = args.train_minutes
    if args.train_until is not None:
        minutes = max(0.5, min(minutes, (args.train_until - time.time()) / 60))
        log(f"train: {minutes:.2f} min budget (until {time.strftime('%H:%M:%S', time.localtime(args.train_until))})")
    data = load_train_data(root / "atlas", root / "stats.npz", root / "procedural", acfg, render_resolution=32)
    cfg = TrainConfig(model=ModelConfig(size=args.size, sample_size=args.side, max_length=16), steps=1_000_000,
                      batch_size=args.batch, lr=args.lr, lr_warmup=200, ema_decay=args.ema_decay, lambda_rgb=0.1,
                      lambda_mask=0.1, render_every=4, render_resolution=32, checkpoint_every=1000,
                      keep_checkpoints=1, log_every=25, max_minutes=minutes, compile=args.compile,
                      sample_every=args.sample_every, sample_steps=20, sample_views=4, sample_resolution=96)
    hist = (root / "history.jsonl").open("a")
    (root / "previews").mkdir(exist_ok=True)

    def on_log(step, m):
        hist.write(json.dumps({"step": step, "time": time.time(), **m}) + "\n")
        hist.flush()
        if step % 500 == 0:
            log(f"train step {step}: loss {m['loss']:.4f} (v {m['loss_v']:.4f})")

    def on_images(step, sheet):
        gio.write_png(root / "previews" / f"step_{step:06d}.png", sheet)

    t = time.perf_counter()
    s = train(cfg, data, acfg, root / "train", log=on_log, images=on_images)
    hist.close()
    model = root / "train" / "model"
    import shutil

    from gaussian_atlas.atlas import sphere_grid_cache_path

    shutil.copy2(root / "stats.npz", model / "stats.npz")
    shutil.copy2(sphere_grid_cache_path(acfg.side, acfg.method, acfg.cache_dir), model / "sphere2grid.npy")
    gio.write_json(model / "atlas.json", to_dict(acfg))
    summary["train_s"] = time.perf_counter() - t
    summary["train"] = {**s, "config": to_dict(cfg), "n_objects": len(data.atlases)}
    log(f"train: {s['step']} steps, {s['samples_per_second']:.0f} samples/s, last loss {s.get('last_loss')}")
    save()


def sample_phase(args, root: Path, summary: dict, save) -> None:
    from gaussian_atlas import io as gio
    from gaussian_atlas.gaussians import write_ply
    from gaussian_atlas.sample import SampleConfig, generate, load_atlas_model, sample_sheet, turntable, write_gif

    model = load_atlas_model(root / "train" / "model", DEV)
    train_caps = {json.loads(line)["caption"] for line in (root / "procedural" / "captions.jsonl").read_text().splitlines()}
    prompts = args.prompts or ["a red torus", "a blue cube", "a yellow sphere", "a green cone", "a white cylinder",
               "a purple capsule", "an orange pyramid", "a red cube on top of a blue cylinder"]
    cfg = SampleConfig(steps=20, guidance=3.5, frames=24, resolution=128)
    t = time.perf_counter()
    _atlas, g, seeds = generate(model, prompts, cfg)
    g.means.sum().item()  # wait for the GPU
    summary["sample_s_per_object"] = (time.perf_counter() - t) / len(prompts)
    frames = turntable(g, cfg)  # [B, F, H, W, 3]
    out = root / "samples"
    out.mkdir(exist_ok=True)
    rows = []
    for i, p in enumerate(prompts):
        slug = p.replace(" ", "_")
        write_gif(out / f"{slug}.gif", frames[i])
        write_ply(out / f"{slug}.ply", g._map(lambda t_: t_[i]).to("cpu"))
        rows.append({"prompt": p, "seed": seeds[i], "in_training_captions": p in train_caps})
    gio.write_png(out / "sheet.png", sample_sheet(frames[:, ::6], prompts))
    summary["samples"] = rows
    log(f"samples: {len(prompts)} prompts -> {out}")
    save()


def evaluate_phase(args, root: Path, summary: dict, save) -> None:
    """The evaluate stage's scores (colour / shape / both for generated, ceiling, floor) without MLflow."""
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.evaluate import EvaluateConfig, ceiling_atlases, evaluate, index_prompts
    from gaussian_atlas.sample import SampleConfig, load_atlas_model, sample_sheet

    index = pd.read_parquet(root / "atlas" / "index.parquet")
    seen, held, comp = args.eval_prompts
    cfg = EvaluateConfig(n_seen=seen, n_held_out=held, n_compositions=comp, n_views=args.eval_views, resolution=128,
                         samples_per_prompt=args.eval_samples,
                         sample=SampleConfig(steps=20, guidance=3.5, batch_size=16, frames=12, resolution=128))
    specs = index_prompts(index, cfg)
    model = load_atlas_model(root / "train" / "model", DEV)
    t = time.perf_counter()
    ev = evaluate(model, specs, cfg, ceiling_atlases(index, root / "atlas", specs, limit=cfg.samples_per_prompt))
    out = root / "evaluate"
    out.mkdir(exist_ok=True)
    gio.write_json(out / "evaluate.json", ev.metrics)
    pd.DataFrame(ev.rows).to_csv(out / "scores.csv", index=False)
    gio.write_png(out / "views.png", sample_sheet(ev.views["generated"],
                                                  [s.prompt for s in specs for _ in range(cfg.samples_per_prompt)]))
    summary["evaluate_s"] = time.perf_counter() - t
    summary["evaluate"] = {src: ev.metrics.get(src) for src in ("generated", "ceiling", "floor")}
    g = ev.metrics["generated"]
    log(f"evaluate: {len(specs)} prompts; generated both {g['both_accuracy']} (ceiling "
        f"{(ev.metrics.get('ceiling') or {}).get('both_accuracy')}, floor {ev.metrics['floor']['both_accuracy']}) -> {out}")
    save()


if __name__ == "__main__":
    main()
