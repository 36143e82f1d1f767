"""The 2D prior: captioned RGBA images of every shape x colour pair, the same UNet with 4 channels,
a diffusers folder that `train.model.pretrained` loads and widens to 16 channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gaussian_atlas.model import ModelConfig, load_model
from gaussian_atlas.pretrain2d import Prior2dData, image_sheet, load_images, pretrain2d, render_prior_images, sample_images
from gaussian_atlas.procedural import COLORS, SHAPES, ProceduralConfig, object_specs
from gaussian_atlas.train import TrainConfig


def test_prior_set_covers_every_pair_and_differs_from_the_3d_objects():
    """At the default size the 2D singles cover all 108 shape x colour pairs (held-out ones included),
    and its objects are other objects than the 3D set's (another master seed)."""
    from gaussian_atlas.pretrain2d import _procedural_config

    cfg = Prior2dData(n_objects=144, views=2, composition_fraction=0.25, seed=1000, supersample=1, workers=0)
    specs = object_specs(_procedural_config(cfg, 16))
    pairs = {(p["shape"], p["color"]) for s in specs if len(s["parts"]) == 1 for p in s["parts"]}
    assert pairs == {(s, c) for s in SHAPES for c in COLORS}
    seeds3d = {s["seed"] for s in object_specs(ProceduralConfig(n_objects=144, seed=0))}
    assert not seeds3d & {s["seed"] for s in specs}


def test_pretrain2d_writes_a_folder_train_loads_and_widens(tmp_path):
    cfg = Prior2dData(n_objects=3, views=2, composition_fraction=0.34, seed=1000, supersample=1, workers=0)
    render_prior_images(cfg, 16, tmp_path / "images", progress=False)
    images, captions = load_images(tmp_path / "images")
    assert images.shape == (6, 4, 16, 16) and len(captions) == 6
    assert images.min() >= -1 and images.max() <= 1
    assert (images[:, 3] > 0).any() and (images[:, 3] < 0).any()  # alpha: object and background
    tcfg = TrainConfig(model=ModelConfig(size="tiny", channels=4, sample_size=16, max_length=16), steps=3,
                       batch_size=2, checkpoint_every=2, mixed_precision="no", log_every=1)
    logged = []
    s = pretrain2d(tcfg, images, captions, tmp_path / "prior", log=lambda k, m: logged.append((k, m["loss_v"])))
    assert s["step"] == 3 and [k for k, _ in logged] == [1, 2, 3] and np.isfinite([v for _, v in logged]).all()
    model = tmp_path / "prior" / "model"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (model / sub).is_dir()
    pics = sample_images(model, [captions[0], "a green torus"], [0, 1], steps=2)
    assert pics.shape == (2, 16, 16, 3) and pics.dtype == np.uint8
    assert image_sheet(pics, ["a", "b"], ncols=2).ndim == 3

    # train.model.pretrained = that folder: widened 4 -> 16 by the paper's rule, text encoder frozen
    unet4, te4, _ = load_model(ModelConfig(pretrained=str(model), channels=4, sample_size=16))
    unet, te, tok = load_model(ModelConfig(pretrained=str(model), channels=16, sample_size=16))
    assert unet.conv_in.in_channels == 16 and unet.conv_out.out_channels == 16
    assert not any(p.requires_grad for p in te.parameters())
    x = torch.randn(1, 4, 16, 16)
    ids = tok(["a red cube"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    ctx = te(ids)[0]
    with torch.no_grad():
        v4 = unet4(x, 10, encoder_hidden_states=ctx).sample
        v16 = unet(x.repeat(1, 4, 1, 1), 10, encoder_hidden_states=ctx).sample
    assert torch.allclose(v16, v4.repeat(1, 4, 1, 1), atol=1e-4)  # four copies of an image: the 2D response
    # the prior's tokenizer is the one trained with it: every word of its captions is known
    assert all(tok.unk_token_id not in ids for ids in tok(captions).input_ids)


def test_disabled_stage_renders_and_trains_nothing_and_says_why(tmp_path):
    """pretrain2d.enabled: false (the CPU demo): every output folder holds SKIPPED.md with the reason, the metrics
    file the same reason, and nothing is rendered or trained."""
    import json

    import yaml

    from stages import pretrain2d as stage

    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain2d"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = {k: tmp_path / k for k in ("images", "out", "reports")}
    stage.main(["--params", str(tmp_path / "params.yaml"), "--images", str(out["images"]), "--out", str(out["out"]),
                "--reports", str(out["reports"]), "--metrics", str(tmp_path / "m.json")])
    for d in out.values():
        assert [f.name for f in d.iterdir()] == ["SKIPPED.md"]
        assert "pretrain2d.enabled is false" in (d / "SKIPPED.md").read_text()
    assert "pretrain2d.enabled is false" in json.loads((tmp_path / "m.json").read_text())["skipped"]
