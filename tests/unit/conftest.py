"""Fixtures of the unit tests: two small procedural objects to fit, and a tiny (untrained) model folder laid out
like the train stage's output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_CAPTIONS = ["a red cube", "a blue sphere", "a green torus", "a red cone on top of a blue cube",
                 "a yellow cylinder", "an orange pyramid"]


def make_model_folder(path: Path, side: int = 8, captions=TINY_CAPTIONS) -> Path:
    """``unet/ text_encoder/ tokenizer/ scheduler/ stats.npz sphere2grid.npy atlas.json`` of a
    from-config tiny model (random weights) whose statistics come from atlases of spheres."""
    from dataclasses import asdict

    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from gaussian_atlas.atlas import AtlasConfig, gaussians_to_atlas, sphere_to_grid
    from gaussian_atlas.gaussians import Gaussians
    from gaussian_atlas.model import ModelConfig, load_model
    from gaussian_atlas.normalize import RunningStats

    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    acfg = AtlasConfig(side=side, method="scipy", cache_dir=str(path.parent / "atlas_cache"))
    unet, text_encoder, tokenizer = load_model(ModelConfig(sample_size=side, max_length=16), captions)
    unet.save_pretrained(path / "unet")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    DPMSolverMultistepScheduler.from_config(ddpm.config, algorithm_type="dpmsolver++").save_pretrained(
        path / "scheduler")
    grid = sphere_to_grid(side, acfg.method, acfg.cache_dir)
    np.save(path / "sphere2grid.npy", grid.numpy())
    stats = RunningStats()
    gen = torch.Generator().manual_seed(0)
    for k in range(4):  # opaque coloured spheres of side^2 Gaussians
        n = side * side
        d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
        g = Gaussians.from_activated(means=d * (0.5 + 0.1 * k), quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                                     scales=torch.full((n, 3), 0.08), opacities=torch.full((n,), 0.9),
                                     rgb=torch.rand(3, generator=gen).expand(n, 3).clone())
        atlas, _ = gaussians_to_atlas(g, acfg, grid=grid)
        stats.update(atlas[None])
    stats.save(path / "stats.npz")
    (path / "atlas.json").write_text(json.dumps(asdict(acfg)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def objects(tmp_path_factory):
    """Two single-primitive procedural objects at 32², 12 views, as :class:`FitInput` (fit and anchor tests)."""
    from gaussian_atlas.cameras import ViewConfig
    from gaussian_atlas.data import load_object
    from gaussian_atlas.fit import FitInput
    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import ProceduralConfig, generate_dataset

    root = tmp_path_factory.mktemp("proc")
    cfg = ProceduralConfig(n_objects=2, composition_fraction=0.0, seed=3, workers=0, render=RenderConfig(
        views=ViewConfig(n_views=12, n_ring=8, resolution=32), supersample=1, n_surface_samples=600))
    generate_dataset(cfg, root, progress=False)
    return [FitInput.from_loaded(d.name, load_object(d)) for d in sorted((root / "objects").iterdir())]
