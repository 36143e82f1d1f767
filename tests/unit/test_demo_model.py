"""The shipped demo model (models/demo-prior, params.yaml: train.model.pretrained and atlas.grid): it loads as the
train stage and the sampler load it, matches the demo's settings, and makes the prompted objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
MODEL = ROOT / PARAMS["train"]["model"]["pretrained"]


def test_params_point_at_the_shipped_model_and_its_plane_index():
    assert MODEL.is_dir(), f"train.model.pretrained = {MODEL} is not in the repository"
    assert ROOT / PARAMS["atlas"]["grid"] == MODEL / "sphere2grid.npy"
    sizes = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert sizes <= 25 * 2**20, f"{MODEL} is {sizes / 2**20:.1f} MiB (issue #17: <= 25 MB)"
    for f in ("README.md", "run.json", "history.jsonl"):  # how it was made travels with it
        assert (MODEL / f).is_file()


def test_shipped_model_loads_for_training_with_the_demo_settings():
    from gaussian_atlas.atlas import AtlasConfig, atlas_grid
    from gaussian_atlas.model import ModelConfig, load_model

    m = PARAMS["train"]["model"]
    cfg = ModelConfig(pretrained=str(MODEL), size=m["size"], channels=m["channels"], max_length=m["max_length"],
                      sample_size=PARAMS["atlas"]["side"])
    unet, text_encoder, tokenizer = load_model(cfg, [])
    assert all(p.dtype == torch.float32 for p in unet.parameters())  # fp16 files, fp32 master weights
    assert all(p.dtype == torch.float32 for p in text_encoder.parameters())
    assert unet.config.in_channels == unet.config.out_channels == m["channels"]
    assert unet.config.sample_size == PARAMS["atlas"]["side"]
    assert not any(p.requires_grad for p in text_encoder.parameters())  # frozen, as a pretrained one is
    assert tokenizer.model_max_length == m["max_length"]
    ids = tokenizer(["a red torus"]).input_ids[0]
    assert tokenizer.unk_token_id not in ids  # every word of the generator's captions is known
    grid = atlas_grid(AtlasConfig(side=PARAMS["atlas"]["side"], grid=str(MODEL / "sphere2grid.npy"),
                                  cache_dir=str(ROOT / ".pytest_cache" / "grid")))
    assert torch.equal(torch.sort(grid).values, torch.arange(PARAMS["atlas"]["side"] ** 2))


def test_a_plane_index_that_is_not_a_permutation_is_refused(tmp_path):
    from gaussian_atlas.atlas import AtlasConfig, atlas_grid

    bad = tmp_path / "grid.npy"
    np.save(bad, np.zeros(64, dtype=np.int64))
    with pytest.raises(ValueError, match="grid.npy is not a plane index of a 8x8 atlas"):
        atlas_grid(AtlasConfig(side=8, grid=str(bad), cache_dir=str(tmp_path / "c")))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        atlas_grid(AtlasConfig(side=8, grid=str(tmp_path / "missing.npy"), cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("prompt", ["a red torus", "a blue cube"])
def test_shipped_model_makes_the_prompted_colour_and_shape(prompt):
    """Seen prompts of the procedural set, 4 samples each: most are scored right by the evaluate stage's scorer."""
    from gaussian_atlas.evaluate import EvaluateConfig, PromptSpec, evaluate, parse_caption
    from gaussian_atlas.sample import SampleConfig, load_atlas_model

    model = load_atlas_model(MODEL)
    cfg = EvaluateConfig(n_views=4, resolution=64, samples_per_prompt=4, n_bootstrap=100,
                         sample=SampleConfig(steps=20, guidance=3.5, batch_size=4))
    specs = [PromptSpec(prompt=prompt, parts=parse_caption(prompt), held_out=False, kind="single")]
    ev = evaluate(model, specs, cfg)
    gen = [r for r in ev.rows if r["source"] == "generated"]
    assert sum(r["colour_correct"] for r in gen) >= 3, gen
    assert sum(r["both_correct"] for r in gen) >= 2, gen

