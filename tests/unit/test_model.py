"""The denoiser's building blocks: Marigold widening, the tiny UNet, the offline tokenizer, pretrained loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gaussian_atlas.model import (ModelConfig, build_text_encoder, build_tokenizer, load_model, unet_config,
                                  widen_conv_in, widen_conv_out)

CAPTIONS = ["a red cube", "a blue cylinder", "a red cube on top of a blue cylinder"]


def test_widened_conv_in_gives_the_pretrained_response_to_repeated_latents():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    wide = widen_conv_in(conv, 4)
    x = torch.randn(2, 4, 9, 9)
    assert wide.weight.shape == (8, 16, 3, 3)
    assert torch.allclose(wide(x.repeat(1, 4, 1, 1)), conv(x), atol=1e-6)


def test_widened_conv_out_repeats_the_pretrained_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    wide = widen_conv_out(conv, 4)
    h = torch.randn(2, 8, 9, 9)
    out = wide(h)
    for k in range(4):
        assert torch.allclose(out[:, 4 * k:4 * k + 4], conv(h), atol=1e-6)


def test_offline_tokenizer_and_tiny_model_from_config(tmp_path):
    unet, te, tok = load_model(ModelConfig(sample_size=16, max_length=12), CAPTIONS)
    ids = tok(["a red cube", "a green teapot"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert ids.shape == (2, 12)
    assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0].tolist()
    assert tok.unk_token_id in ids[1].tolist()  # "green" and "teapot" were never seen
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red cube"
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(["a red cube"]).input_ids[0] == ids[0][:5].tolist()

    emb = te(ids).last_hidden_state  # [2, 12, 64]
    x = torch.randn(2, 16, 16, 16)
    out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample
    assert out.shape == (2, 16, 16, 16) and torch.isfinite(out).all()
    assert any(p.requires_grad for p in te.parameters())  # trained when built from config


def test_pretrained_checkpoint_is_widened_and_text_encoder_frozen(tmp_path):
    """A 4-channel SD-style folder (made here: no hub) loads through the real from_pretrained path."""
    from diffusers import UNet2DConditionModel

    tok = build_tokenizer(CAPTIONS, 12)
    te = build_text_encoder(tok)
    sd = UNet2DConditionModel(**unet_config("tiny", 4, 16, te.config.hidden_size))
    sd.save_pretrained(tmp_path / "ckpt" / "unet")
    te.save_pretrained(tmp_path / "ckpt" / "text_encoder")
    tok.save_pretrained(tmp_path / "ckpt" / "tokenizer")

    unet, te2, tok2 = load_model(ModelConfig(pretrained=str(tmp_path / "ckpt"), sample_size=16))
    assert unet.config.in_channels == 16 and unet.conv_in.weight.shape[1] == 16 and unet.conv_out.out_channels == 16
    assert not any(p.requires_grad for p in te2.parameters())
    emb = te2(tok2(["a red cube"], return_tensors="pt").input_ids).last_hidden_state
    x4 = torch.randn(1, 4, 16, 16)
    t = torch.tensor([100])
    with torch.no_grad():  # four copies of a latent in -> the pretrained prediction, four times
        ref = sd(x4, t, encoder_hidden_states=emb).sample
        out = unet(x4.repeat(1, 4, 1, 1), t, encoder_hidden_states=emb).sample
    for k in range(4):
        assert torch.allclose(out[:, 4 * k:4 * k + 4], ref, atol=1e-5)
    with pytest.raises(ValueError, match="cannot load the pretrained model"):
        load_model(ModelConfig(pretrained=str(tmp_path / "nothing-here")))
