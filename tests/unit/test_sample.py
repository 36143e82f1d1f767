"""The sampler: the fast path's settings, and the refactored denoising loop against diffusers' plain loop."""

from __future__ import annotations

import pytest
import torch

from gaussian_atlas.sample import SampleConfig, fast_settings, generate, load_atlas_model, prepare_model, sample_atlases


def _reference_loop(unet, te, tok, scheduler, prompts, seeds, steps, guidance):
    """The loop as diffusers' pipelines write it: noise per seed, CFG halves, DPM-Solver++ step by step."""
    from gaussian_atlas.sample import _noise, encode_prompts

    C, S = unet.config.in_channels, unet.config.sample_size
    cond = encode_prompts(te, tok, prompts, torch.device("cpu"))
    ctx = torch.cat([encode_prompts(te, tok, [""] * len(prompts), torch.device("cpu")), cond])
    x = _noise(seeds, (C, S, S))
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        v_u, v_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        x = scheduler.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
    return x


@torch.no_grad()
def test_sampler_equals_the_plain_diffusers_loop(tiny_model_dir):
    m = load_atlas_model(tiny_model_dir)
    prompts, seeds = ["a red cube", "a blue torus", "a green cone"], [3, 4, 5]
    ours = sample_atlases(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, seeds, steps=4, guidance=3.5,
                          batch_size=2)  # batches of 2 and 1: a sample does not depend on its batch
    ref = _reference_loop(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, seeds, 4, 3.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_fast_settings_are_off_on_the_cpu_and_on_for_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_settings(SampleConfig(), cpu) == (torch.float32, None, False)
    assert fast_settings(SampleConfig(), cuda) == (torch.bfloat16, "default", True)
    assert fast_settings(SampleConfig(dtype="float32", compile="off", cuda_graph="off"), cuda) == (
        torch.float32, None, False)
    assert fast_settings(SampleConfig(compile="max-autotune-no-cudagraphs"), cpu)[1] == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="cuda_graph: on needs a CUDA device"):
        fast_settings(SampleConfig(cuda_graph="on"), cpu)


@pytest.mark.parametrize("field, value", [("dtype", "fp16"), ("compile", "reduce-overhead"), ("cuda_graph", "yes")])
def test_bad_fast_path_settings_are_refused_naming_the_key(field, value):
    with pytest.raises(ValueError, match=f"sample.{field}"):
        SampleConfig(**{field: value})


def test_graphs_are_refused_off_cuda(tiny_model_dir):
    m = load_atlas_model(tiny_model_dir)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        sample_atlases(m.unet, m.text_encoder, m.tokenizer, m.scheduler, ["a red cube"], [0], steps=2, graphs={})


def test_prepare_model_casts_once_and_generate_follows_the_dtype(tiny_model_dir):
    m = load_atlas_model(tiny_model_dir)
    cfg = SampleConfig(steps=2, dtype="bfloat16", compile="off")
    unet, graphs = prepare_model(m, cfg)
    assert graphs is None and unet is m.unet and next(m.unet.parameters()).dtype == torch.bfloat16
    assert prepare_model(m, cfg)[0] is unet  # prepared once
    atlas, g, seeds = generate(m, ["a red cube"], cfg)
    assert atlas.dtype == torch.float32 and torch.isfinite(atlas).all() and seeds == [0]
    # back to float32: the same samples as a freshly loaded float32 model
    a32, _, _ = generate(m, ["a red cube"], SampleConfig(steps=2))
    b32, _, _ = generate(load_atlas_model(tiny_model_dir), ["a red cube"], SampleConfig(steps=2))
    torch.testing.assert_close(a32, b32, rtol=1e-2, atol=1e-2)  # bf16 round trip of the weights


@torch.no_grad()
def test_the_loop_as_captured_needs_no_index_search(tiny_model_dir):
    """What the CUDA graph captures (a private scheduler copy starting from set_begin_index(0)) gives the
    eager loop's samples: the captured loop has no host-side index search, and the same arithmetic."""
    from gaussian_atlas.sample import _denoise, _noise, encode_prompts

    m = load_atlas_model(tiny_model_dir)
    prompts, seeds = ["a red cube", "a blue torus"], [7, 8]
    ref = sample_atlases(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, seeds, steps=5)
    cpu = torch.device("cpu")
    ctx = torch.cat([encode_prompts(m.text_encoder, m.tokenizer, [""], cpu).expand(2, -1, -1),
                     encode_prompts(m.text_encoder, m.tokenizer, prompts, cpu)])
    sched = type(m.scheduler).from_config(m.scheduler.config)
    sched.set_timesteps(5)
    sched.set_begin_index(0)
    sched.index_for_timestep = None  # an index search would now fail
    x = _denoise(m.unet, sched, _noise(seeds, (16, m.unet.config.sample_size, m.unet.config.sample_size)), ctx,
                 3.5, torch.float32)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
