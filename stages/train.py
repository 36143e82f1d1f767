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
(``gaussian_atlas/atlas_pyfunc.py``: a list of prompts or a DataFrame with a ``prompt`` column in, PLYs out;
params ``out_dir``, ``steps``, ``guidance``, ``batch_size``, ``seed``, defaulting to ``params.yaml: evaluate.sample``).
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.common import StageError, StageResult, StageRun, main_guard, register_model, stage_main

FLAGS = [("--atlas", "data/atlas", "atlas stage output"),
         ("--stats", "data/normalize/stats.npz", "normalisation statistics"),
         ("--ingested", "data/ingested", "reference views for the rendering losses"),
         ("--out", "models/atlas-unet", "checkpoints + final model"),
         ("--register", None, "MLflow registered-model name (default: params.yaml mlflow.registered_model; '' = do "
          "not register, log the folder as plain artifacts)", {"metavar": "NAME"})]


def body(run: StageRun) -> StageResult | None:
    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.train import TrainConfig, load_train_data, package_model, train

    args = run.args
    params = run.params()
    register = args.register if args.register is not None else (params.get("mlflow") or {}).get("registered_model") or ""
    atlas_section = {k: v for k, v in (params.get("atlas") or {}).items() if k not in ("batch_objects", "device")}
    atlas_cfg = from_dict(AtlasConfig, atlas_section, "params.yaml: atlas")
    cfg = from_dict(TrainConfig, train_section(params, atlas_cfg.side), "params.yaml: train", complete=True)
    sample = sample_config(params) if register else None  # a config error fails before training, not after
    data = load_train_data(args.atlas, args.stats, args.ingested, atlas_cfg, cfg.render_resolution)
    out = Path(args.out)
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks of `accelerate launch`/torchrun: train, log nothing
        train(cfg, data, atlas_cfg, out)
        return None
    run.start({**to_dict(cfg), "n_atlases": len(data.atlases)})
    summary = train(cfg, data, atlas_cfg, out, progress=True, log=run.log_step, images=run.log_image)
    model = package_model(out / "model", args.stats, atlas_cfg)  # self-contained: statistics + atlas layout
    for snap in sorted((out / "snapshots").glob("step-*")):  # train.snapshots: the EMA model over training
        package_model(snap, args.stats, atlas_cfg)
    if register:  # its predict params default to the sampler the evaluate stage scores it with
        register_model(model, register, sample)
    return StageResult({k: round(v, 6) for k, v in summary.items() if isinstance(v, (int, float))},
                       f"train: {summary['step']} steps, last loss {summary.get('last_loss', float('nan')):.4f}, "
                       f"{summary['samples_per_second']:.1f} samples/s -> {model}",
                       artifacts=[] if register else [(model, "model")],
                       mlflow_metrics={"samples_per_second": summary["samples_per_second"],
                                       "train_seconds": summary["seconds"]})


def sample_config(params: dict):
    """``params.yaml: evaluate.sample`` (every key given): the defaults of the registered model's predict params."""
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.sample import SampleConfig

    section = (params.get("evaluate") or {}).get("sample")
    if section is None:
        raise StageError("params.yaml: no evaluate.sample section (the registered model's sampler defaults)")
    return from_dict(SampleConfig, section, "params.yaml: evaluate.sample", complete=True)


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



main = stage_main("train", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
