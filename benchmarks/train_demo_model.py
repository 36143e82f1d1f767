"""Train the demo's starting model on a GPU: the CPU demo's UNet (``params.yaml: train.model``), from config,
on the 3D training atlases of the transfer run (``benchmarks/transfer_run.py data``), so that ``make demo``
fine-tunes a model that already makes recognisable objects (issue #17; the paper's own idea of starting
from a pretrained model).

    python benchmarks/transfer_run.py data --out W            # the atlases (shared with the transfer experiment)
    python benchmarks/train_demo_model.py --out W --steps 4000 # -> W/demo/model (diffusers layout + stats + grid)
    python benchmarks/train_demo_model.py --export W/demo/model models/demo-prior   # here: fp16 safetensors, README

Same model settings as the demo (size, text length, channels, ``sample_size`` = ``atlas.side``) read from
``params.yaml``; the GPU schedule (steps, batch, learning rate) from the arguments. The objects whose caption
is one of the demo's held-out prompts (``generate.holdout`` of ``params.yaml``) are left out as well as the
transfer run's own held-out ones, so the demo's held-out scores stay held out. ``W/demo/run.json`` records
the arguments, the training summary, the captions left out and the device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def demo_held_out(params: dict) -> set[str]:
    """Captions of the demo's held-out prompts (``generate.holdout`` with ``generate.seed``)."""
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.procedural import HoldoutConfig, ProceduralConfig, _caption, _part, holdout_sets

    gen = params.get("generate") or {}
    h = from_dict(HoldoutConfig, gen.get("holdout") or {}, "params.yaml: generate.holdout")
    singles, stacks = holdout_sets(ProceduralConfig(seed=int(gen.get("seed", 0)), holdout=h))
    return {_caption([_part(sh, c)]) for sh, c in singles} | {_caption([_part(*a), _part(*b)]) for a, b in stacks}


def subset(data, keep: np.ndarray):
    """The rows ``keep [M] bool`` of a :class:`~gaussian_atlas.train.TrainData` (per-object fields only)."""
    idx = torch.from_numpy(np.flatnonzero(keep))
    per_object = {"atlases", "centers", "scales", "ref_rgb", "ref_alpha", "ref_c2w", "ref_K"}
    out = {f.name: getattr(data, f.name)[idx] for f in fields(data) if f.name in per_object}
    return replace(data, captions=[c for c, k in zip(data.captions, keep) if k], **out)


def train_demo(args) -> None:
    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.train import TrainConfig, load_train_data, package_model, train
    from stages.common import load_params
    from stages.train import train_section

    params = load_params(None, args.params)
    root, out = Path(args.out), Path(args.out) / "demo"
    out.mkdir(parents=True, exist_ok=True)
    acfg = AtlasConfig(side=int(params["atlas"]["side"]), method="auto", cache_dir=str(root / "atlas_cache"))
    section = train_section(params, acfg.side)
    section.update(steps=args.steps, batch_size=args.batch, lr=args.lr, lr_warmup=args.warmup, log_every=25,
                   render_every=4, checkpoint_every=max(args.steps // 4, 1), keep_checkpoints=1, sample_every=0,
                   snapshots=[], max_minutes=args.max_minutes, seed=args.seed, compile=False)
    cfg = from_dict(TrainConfig, section, "params.yaml: train (+ GPU schedule)", complete=True)
    data = load_train_data(root / "atlas", root / "stats.npz", root / "procedural", acfg, cfg.render_resolution)
    held = demo_held_out(params)
    keep = np.array([c.strip().lower() not in held for c in data.captions])
    left_out = sorted({c for c, k in zip(data.captions, keep) if not k})
    data = subset(data, keep)
    print(f"demo model: {len(data.captions)} atlases ({len(left_out)} captions of the demo's held-out prompts "
          f"left out: {left_out})", flush=True)
    hist = (out / "history.jsonl").open("a")
    t = time.perf_counter()
    s = train(cfg, data, acfg, out / "train", progress=False,
              log=lambda k, m: (hist.write(json.dumps({"step": k, **m}) + "\n"), hist.flush()))
    hist.close()
    package_model(out / "train" / "model", root / "stats.npz", acfg)
    run = {"argv": sys.argv[1:], "args": vars(args), "train_config": section, "summary": s,
           "seconds": time.perf_counter() - t, "n_atlases": len(data.captions), "left_out_captions": left_out,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    print(f"demo model: {s['step']} steps, {s['samples_per_second']:.0f} samples/s, last loss "
          f"{s.get('last_loss', float('nan')):.4f} -> {out / 'train' / 'model'}", flush=True)


def export(src: Path, dst: Path) -> None:
    """Copy a trained model folder as the shipped demo model: weights as fp16 safetensors (the demo upcasts)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    UNet2DConditionModel.from_pretrained(src / "unet").to(torch.float16).save_pretrained(tmp / "unet")
    CLIPTextModel.from_pretrained(src / "text_encoder").to(torch.float16).save_pretrained(tmp / "text_encoder")
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(src / name, tmp / name)
    for name in ("stats.npz", "sphere2grid.npy", "atlas.json"):
        shutil.copy2(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    print(f"exported {src} -> {dst}")


def log_mlflow(model: Path, experiment: str = "demo-prior") -> str:
    """One MLflow run for a shipped model folder: its training config as params, ``history.jsonl`` as metrics
    per step, the summary, and the model card + run record as artifacts. A folder already logged is refused."""
    import mlflow

    from stages.common import git_commit, setup_mlflow

    run = json.loads((model / "run.json").read_text())
    exp_id = setup_mlflow(experiment)
    source = f"{model.resolve()}@{hashlib_file(model / 'run.json')}"
    client = mlflow.MlflowClient()
    if client.search_runs([exp_id], filter_string=f"tags.`gatlas.source` = '{source}'", max_results=1):
        raise SystemExit(f"{model} is already logged in experiment {experiment!r}")
    flat = {}
    for k, v in run["train_config"].items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    with mlflow.start_run(experiment_id=exp_id, run_name=model.name,
                          tags={"gatlas.source": source, "gatlas.device": run.get("device", ""),
                                "mlflow.source.git.commit": git_commit(), "gatlas.command": " ".join(run["argv"])}) as r:
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()} | {"n_atlases": run["n_atlases"]})
        for line in (model / "history.jsonl").read_text().splitlines():
            row = json.loads(line)
            step = int(row.pop("step"))
            mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in run["summary"].items() if isinstance(v, (int, float))})
        for f in ("README.md", "run.json", "train.log"):
            if (model / f).exists():
                mlflow.log_artifact(str(model / f))
        print(f"logged {model} as run {r.info.run_id} in experiment {experiment!r}")
        return r.info.run_id


def hashlib_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="the transfer run's working folder (reads atlas/, stats.npz, procedural/)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="safety stop (0 = none)")
    ap.add_argument("--export", nargs=2, metavar=("MODEL", "DEST"), help="export a trained model folder instead")
    ap.add_argument("--log-mlflow", type=Path, metavar="MODEL", help="log a shipped model folder's record to MLflow")
    args = ap.parse_args()
    if args.log_mlflow:
        log_mlflow(args.log_mlflow)
    elif args.export:
        export(Path(args.export[0]), Path(args.export[1]))
    elif not args.out:
        ap.error("--out is needed to train")
    else:
        train_demo(args)


if __name__ == "__main__":
    main()
