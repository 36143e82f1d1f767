"""The trained model as an MLflow pyfunc (MLflow "models from code"), logged and registered by the train stage.

    import mlflow
    m = mlflow.pyfunc.load_model("models:/gaussian-atlas-unet/latest")
    m.predict(["a red torus", "a green cone"])                              # a list of prompts
    m.predict("a red torus", params={"out_dir": "out", "steps": 20, "seed": 7})
    m.predict(pd.DataFrame({"prompt": ["a red torus"], "seed": [0]}))       # a seed per row

Input: a list of prompts, one prompt, or a DataFrame with a ``prompt`` column and an optional ``seed``
column (anything else is refused with a ``TypeError``/``ValueError`` naming what was passed). Params (the
logged signature's params schema, :func:`param_defaults`): ``out_dir`` (default ``""``: a new temporary
folder), ``steps``, ``guidance``, ``batch_size``, ``seed`` (prompt *i* without a seed of its own gets
``seed + i``); their defaults are ``params.yaml: evaluate.sample`` as it was when the model was registered.
``predict`` samples each prompt (DPM-Solver++) and writes ``<out_dir>/<i>_<slug>.ply`` (INRIA layout); it
returns one row per prompt: ``prompt, seed, ply, steps, guidance`` (:data:`OUTPUT_COLUMNS`). The output
folder is made only once the samples exist, and a call that fails leaves no folder (nor PLYs) behind.
The model folder (UNet with EMA weights, text encoder, tokenizer, scheduler, normalisation statistics,
atlas grid) travels as the artifact ``model_dir``.

The logged signature has no input schema on purpose: MLflow enforces a named-column schema before
``predict`` runs and refuses a plain list there (``Model is missing inputs ['prompt']``); the input is
checked here instead (:func:`prompts_and_seeds`).

MLflow runs this file by its path (``mlflow.pyfunc.log_model(python_model=<this file>)``, under a module name
of its own); only then does it import MLflow and define the ``PythonModel``. Imported as
``gaussian_atlas.atlas_pyfunc`` it is plain library code: :func:`load`, :func:`predict`, no MLflow.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

SAMPLER_PARAMS = ("steps", "guidance", "batch_size", "seed")
"""Params that set the sampler (fields of :class:`gaussian_atlas.sample.SampleConfig`)."""

OUTPUT_COLUMNS = {"prompt": "string", "seed": "long", "ply": "string", "steps": "long", "guidance": "double"}
"""The columns ``predict`` returns and their MLflow types."""

INPUT_DOC = ("a list of prompts, one prompt string, or a DataFrame with a 'prompt' column (string) and an "
             "optional 'seed' column (integer)")


def param_defaults(sample) -> dict[str, Any]:
    """The params schema's defaults from a :class:`gaussian_atlas.sample.SampleConfig` (the train stage passes
    ``params.yaml: evaluate.sample``): ``out_dir`` ``""`` (a temporary folder) and the sampler's settings."""
    return {"out_dir": "", "steps": int(sample.steps), "guidance": float(sample.guidance),
            "batch_size": int(sample.batch_size), "seed": int(sample.seed)}


def load(model_dir: str | Path):
    """The model folder as an :class:`gaussian_atlas.sample.AtlasModel`, on the GPU when there is one."""
    from gaussian_atlas.config import resolve_device
    from gaussian_atlas.sample import load_atlas_model

    return load_atlas_model(model_dir, resolve_device("auto"))


def prompts_and_seeds(model_input: Any) -> tuple[list[str], list[int | None]]:
    """``(prompts, seeds)`` from what a user passes (see the module docstring); a row without a seed gets None.

    Raises
    ------
    TypeError
        Not a str, a list/tuple/array/Series of str, a DataFrame, a dict of columns or a list of row dicts.
    ValueError
        A DataFrame (or dict) without a ``prompt`` column, a prompt that is not a string, a seed that is
        not an integer, or no prompts at all.
    """
    import numpy as np

    if isinstance(model_input, str):
        model_input = [model_input]
    elif isinstance(model_input, dict):
        model_input = pd.DataFrame({k: v if isinstance(v, (list, tuple, np.ndarray, pd.Series)) else [v]
                                    for k, v in model_input.items()})
    elif isinstance(model_input, (list, tuple)) and model_input and all(isinstance(r, dict) for r in model_input):
        model_input = pd.DataFrame(list(model_input))  # row records, e.g. a serving request
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"predict: a DataFrame needs a 'prompt' column; got columns {list(model_input.columns)}")
        prompts = list(model_input["prompt"])
        seeds = list(model_input["seed"]) if "seed" in model_input.columns else [None] * len(prompts)
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        prompts = list(np.asarray(model_input, dtype=object).ravel()) if isinstance(model_input, np.ndarray) \
            else list(model_input)
        seeds = [None] * len(prompts)
    else:
        raise TypeError(f"predict takes {INPUT_DOC}; got {type(model_input).__name__}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"predict: every prompt must be a string; got {type(bad[0]).__name__} {bad[0]!r}")
    if not prompts:
        raise ValueError("predict: no prompts given")
    out_seeds: list[int | None] = []
    for s in seeds:
        if s is None or (pd.api.types.is_scalar(s) and pd.isna(s)):  # no seed column, or a missing value in it
            out_seeds.append(None)
        elif isinstance(s, (int, np.integer)) or (isinstance(s, (float, np.floating)) and float(s).is_integer()):
            out_seeds.append(int(s))
        else:
            raise ValueError(f"predict: a seed must be an integer; got {type(s).__name__} {s!r}")
    return [str(p) for p in prompts], out_seeds


def predict(model, model_input: Any, params: dict | None = None) -> pd.DataFrame:
    """Sample one object per prompt, write its PLY; one row per prompt (:data:`OUTPUT_COLUMNS`).

    ``params``: ``out_dir`` (empty or missing: a new temporary folder), ``steps``, ``guidance``,
    ``batch_size``, ``seed`` (missing ones: :class:`gaussian_atlas.sample.SampleConfig`'s; the registered
    model's params schema fills them from ``evaluate.sample``). Unknown keys raise ``ValueError``.
    """
    from gaussian_atlas.gaussians import write_ply
    from gaussian_atlas.sample import SampleConfig, generate

    prompts, row_seeds = prompts_and_seeds(model_input)
    params = {k: v for k, v in dict(params or {}).items() if v is not None}
    unknown = sorted(set(params) - {"out_dir", *SAMPLER_PARAMS})
    if unknown:
        raise ValueError(f"predict: unknown params {unknown}; known: {['out_dir', *SAMPLER_PARAMS]}")
    out_dir = str(params.pop("out_dir", "") or "")
    cfg = SampleConfig(**params)  # raises on steps < 1, guidance < 1, ...
    seeds = [cfg.seed + i if s is None else s for i, s in enumerate(row_seeds)]
    _atlas, g, seeds = generate(model, prompts, cfg, seeds)

    # the folder exists only once there is something to write; a failure removes what this call made
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="gatlas-"))
    made = not out_dir or not folder.exists()
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(prompts):
            slug = re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")[:60] or "empty"
            written.append(write_ply(folder / f"{i:03d}_{slug}.ply", g._map(lambda t, i=i: t[i]).to("cpu")))
    except BaseException:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for f in written:
                f.unlink(missing_ok=True)
        raise
    return pd.DataFrame({"prompt": prompts, "seed": [int(s) for s in seeds], "ply": [str(f) for f in written],
                         "steps": [cfg.steps] * len(prompts), "guidance": [float(cfg.guidance)] * len(prompts)})


if __name__ != "gaussian_atlas.atlas_pyfunc":  # run by MLflow as a models-from-code file
    import mlflow

    class AtlasGenerator(mlflow.pyfunc.PythonModel):
        # model_input has no type hint: no MLflow type hint says "a list, a str or a DataFrame" (MLflow warns
        # "Add type hints ..."); predict checks it (prompts_and_seeds)
        def load_context(self, context):
            self.model = load(context.artifacts["model_dir"])

        def predict(self, context, model_input, params=None):
            return predict(self.model, model_input, params)

    mlflow.models.set_model(AtlasGenerator())
