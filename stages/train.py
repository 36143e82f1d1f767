"""DVC stage `train`: fine-tune the UNet on the normalised atlases (paper Sec. 5 and 6).

    python -m stages.train --atlas data/atlas --stats data/normalize/stats.npz --out models/atlas-unet

Reads ``params.yaml: train`` (and ``atlas`` to decode atlases for the rendering losses).
Resumes from the newest checkpoint in ``--out`` (``persist: true``). Writes the final
model folder (``<out>/model``: unet/ with EMA weights, text_encoder/, tokenizer/,
scheduler/ (DPM-Solver++), plus ``stats.npz`` and the atlas grid index so it is
self-contained), the EMA model at the steps of ``train.snapshots`` (``<out>/snapshots/step-<k>``, the
same layout), ``metrics/train.json``; logs losses, learning rate and samples/s per
step, preview samples every ``train.sample_every`` steps (``samples/step_*.png``) to MLflow,
and logs the model folder as an MLflow pyfunc registered under ``mlflow.registered_model``
(``stages/atlas_pyfunc.py``: prompts in, PLYs out).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from stages.common import StageError, load_params, main_guard, stage_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", default="data/atlas", help="atlas stage output (default: %(default)s)")
    ap.add_argument("--stats", default="data/normalize/stats.npz", help="normalisation statistics")
    ap.add_argument("--ingested", default="data/ingested", help="reference views for the rendering losses")
    ap.add_argument("--out", default="models/atlas-unet", help="checkpoints + final model (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/train.json", help="DVC metrics file (default: %(default)s)")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    ap.add_argument("--register", default=None, metavar="NAME",
                    help="MLflow registered-model name (default: params.yaml mlflow.registered_model; '' = do not "
                         "register, log the folder as plain artifacts)")
    args = ap.parse_args(argv)

    import mlflow

    from gaussian_atlas import io as gio
    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.train import TrainConfig, load_train_data, package_model, train

    params = load_params(None, args.params)
    if args.register is None:
        args.register = (params.get("mlflow") or {}).get("registered_model") or ""
    atlas_section = {k: v for k, v in (params.get("atlas") or {}).items() if k not in ("batch_objects", "device")}
    atlas_cfg = from_dict(AtlasConfig, atlas_section, "params.yaml: atlas")
    cfg = from_dict(TrainConfig, train_section(params, atlas_cfg.side), "params.yaml: train", complete=True)
    data = load_train_data(args.atlas, args.stats, args.ingested, atlas_cfg, cfg.render_resolution)
    out = Path(args.out)
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks of `accelerate launch`/torchrun: train, log nothing
        train(cfg, data, atlas_cfg, out)
        return
    with stage_run("train", {**to_dict(cfg), "n_atlases": len(data.atlases)}):
        summary = train(cfg, data, atlas_cfg, out, progress=True,
                        log=lambda step, m: mlflow.log_metrics(m, step=step),
                        images=lambda step, sheet: mlflow.log_image(sheet, f"samples/step_{step:06d}.png"))
        model = package_model(out / "model", args.stats, atlas_cfg)  # self-contained: statistics + atlas layout
        for snap in sorted((out / "snapshots").glob("step-*")):  # train.snapshots: the EMA model over training
            package_model(snap, args.stats, atlas_cfg)
        metrics = {k: round(v, 6) for k, v in summary.items() if isinstance(v, (int, float))}
        gio.write_json(args.metrics, metrics)
        mlflow.log_metrics({"samples_per_second": summary["samples_per_second"], "train_seconds": summary["seconds"]})
        if args.register:
            register(model, args.register)
        else:
            mlflow.log_artifacts(str(model), artifact_path="model")
    print(f"train: {summary['step']} steps, last loss {summary.get('last_loss', float('nan')):.4f}, "
          f"{summary['samples_per_second']:.1f} samples/s -> {model}")


def train_section(params: dict, side: int) -> dict:
    """``params.yaml: train`` with ``model.sample_size`` derived from ``atlas.side`` (written once, there)."""
    section = dict(params.get("train") or {})
    model = dict(section.get("model") or {})
    if "sample_size" in model and int(model["sample_size"]) != int(side):
        raise StageError(f"train.model.sample_size ({model['sample_size']}) differs from atlas.side ({side}); it is "
                         "derived from atlas.side: remove it from params.yaml")
    model["sample_size"] = int(side)
    section["model"] = model
    return section


def register(model: Path, name: str) -> None:
    """Log the model folder as an MLflow pyfunc (stages/atlas_pyfunc.py) and register it as ``name``."""
    import mlflow

    reqs = [f"{d}=={_version(d)}" for d in ("torch", "diffusers", "transformers", "numpy", "pandas", "plyfile")]
    info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("atlas_pyfunc.py")),
                                   artifacts={"model_dir": str(model)}, pip_requirements=reqs,
                                   code_paths=[str(Path(__file__).resolve().parents[1] / "src" / "gaussian_atlas")],
                                   registered_model_name=name)
    print(f"train: registered {name!r} version {info.registered_model_version} ({info.model_uri})")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main_guard(main)
