"""The trained model as an MLflow pyfunc (MLflow "models from code"), logged and registered by the train stage.

    import mlflow
    m = mlflow.pyfunc.load_model("models:/gaussian-atlas-unet/latest")
    m.predict(pd.DataFrame({"prompt": ["a red torus"], "seed": [0]}), params={"out_dir": "out", "steps": 20})

``predict`` samples each prompt (DPM-Solver++, guidance from params, default 3.5) and writes
``<out_dir>/<i>_<slug>.ply`` (INRIA layout); it returns the prompt, seed and PLY path per row.
The model folder (UNet with EMA weights, text encoder, tokenizer, scheduler, normalisation
statistics, atlas grid) travels as the artifact ``model_dir``.

MLflow runs this file by its path (``mlflow.pyfunc.log_model(python_model=<this file>)``, under a module name
of its own); only then does it import MLflow and define the ``PythonModel``. Imported as
``gaussian_atlas.atlas_pyfunc`` it is plain library code: :func:`load` and :func:`predict`, no MLflow.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pandas as pd


def load(model_dir: str | Path):
    """The model folder as an :class:`gaussian_atlas.sample.AtlasModel`, on the GPU when there is one."""
    from gaussian_atlas.config import resolve_device
    from gaussian_atlas.sample import load_atlas_model

    return load_atlas_model(model_dir, resolve_device("auto"))


def predict(model, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
    """Sample one object per row (``prompt``, optional ``seed``), write its PLY; rows of prompt, seed, PLY path."""
    from gaussian_atlas.gaussians import write_ply
    from gaussian_atlas.sample import SampleConfig, generate

    params = dict(params or {})
    out_dir = Path(params.pop("out_dir", None) or tempfile.mkdtemp(prefix="gatlas-"))
    cfg = SampleConfig(**{k: v for k, v in params.items() if k in ("steps", "guidance", "batch_size", "seed")})
    prompts = [str(p) for p in model_input["prompt"]]
    seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input else None
    _atlas, g, seeds = generate(model, prompts, cfg, seeds)
    paths = []
    for i, p in enumerate(prompts):
        slug = re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")[:60] or "empty"
        paths.append(str(write_ply(out_dir / f"{i:03d}_{slug}.ply", g._map(lambda t: t[i]).to("cpu"))))
    return pd.DataFrame({"prompt": prompts, "seed": seeds, "ply": paths})


if __name__ != "gaussian_atlas.atlas_pyfunc":  # run by MLflow as a models-from-code file
    import mlflow

    class AtlasGenerator(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.model = load(context.artifacts["model_dir"])

        def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
            return predict(self.model, model_input, params)

    mlflow.models.set_model(AtlasGenerator())
