"""The training loop on the CPU: losses are finite, a killed run resumes to exactly the same weights."""

from __future__ import annotations

from dataclasses import replace

import torch

from gaussian_atlas.atlas import AtlasConfig, sphere_to_grid
from gaussian_atlas.model import ModelConfig
from gaussian_atlas.train import TrainConfig, TrainData, latest_checkpoint, train


def _data(tmp_path, side=8, M=4, V=2, R=16) -> tuple[TrainData, AtlasConfig]:
    g = torch.Generator().manual_seed(0)
    acfg = AtlasConfig(side=side, method="scipy", cache_dir=str(tmp_path / "cache"))
    eye = torch.eye(4).expand(M, V, 4, 4).clone()
    eye[..., 2, 3] = 2.5  # cameras on +z looking down -z at the object
    K = torch.tensor([[20.0, 0, R / 2], [0, 20.0, R / 2], [0, 0, 1]]).expand(M, V, 3, 3).clone()
    atl = torch.randn(M, 16, side, side, generator=g) * 0.5
    return TrainData(
        atlases=atl, captions=["a red cube", "a blue cone", "a red cone", "a blue cube"][:M],
        centers=torch.zeros(M, 3), scales=torch.ones(M), ref_rgb=torch.rand(M, V, R, R, 3, generator=g),
        ref_alpha=torch.rand(M, V, R, R, generator=g), ref_c2w=eye, ref_K=K,
        mean=torch.zeros(16, side, side) + torch.tensor([0, 0, 0, -2, .5, .5, .5, -2, -4, -4, -4, -2, 1, 0, 0, 0.]
                                                          ).view(16, 1, 1),
        std=torch.full((16, side, side), 0.2), grid=sphere_to_grid(side, "scipy", acfg.cache_dir)), acfg


CFG = TrainConfig(model=ModelConfig(sample_size=8, max_length=8), steps=6, batch_size=2, checkpoint_every=2,
                  keep_checkpoints=3, render_resolution=16, lr=1e-3)


def test_losses_finite_and_model_saved(tmp_path):
    data, acfg = _data(tmp_path)
    logs = []
    s = train(CFG, data, acfg, tmp_path / "run", log=lambda step, m: logs.append(m))
    assert s["step"] == 6 and len(logs) == 6
    assert all(torch.isfinite(torch.tensor([m["loss"], m["loss_v"], m["loss_rgb"], m["loss_mask"]])).all()
               for m in logs)
    assert all(m["samples_per_second"] > 0 and m["lr"] >= 0 for m in logs)  # throughput logged per window
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "run" / "model" / sub).is_dir()


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    data, acfg = _data(tmp_path)
    train(CFG, data, acfg, tmp_path / "straight")
    # "killed" after 3 steps: the checkpoint of step 2 survives, step 3 is lost and redone
    partial = train(CFG, data, acfg, tmp_path / "resumed", stop_after=3)
    assert partial["step"] == 3 and latest_checkpoint(tmp_path / "resumed").name == "checkpoint-2"
    train(CFG, data, acfg, tmp_path / "resumed")
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "model" / "unet")
    b = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "model" / "unet")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    # and the weights did move: training is not a no-op
    c = replace(CFG, steps=1)
    train(c, data, acfg, tmp_path / "one")
    one = UNet2DConditionModel.from_pretrained(tmp_path / "one" / "model" / "unet")
    assert any(not torch.equal(p1, p2) for p1, p2 in zip(one.parameters(), a.parameters()))


def test_previews_are_logged_and_leave_training_untouched(tmp_path):
    """Preview sampling swaps EMA weights in and out: the trained weights must be the same as without it."""
    data, acfg = _data(tmp_path)
    sheets = []
    cfg = replace(CFG, steps=4, sample_every=2, sample_steps=2, sample_views=2, sample_resolution=16)
    train(cfg, data, acfg, tmp_path / "with", images=lambda step, img: sheets.append((step, img)))
    train(replace(cfg, sample_every=0), data, acfg, tmp_path / "without")
    assert [s for s, _ in sheets] == [2, 4]
    img = sheets[0][1]
    assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3
    assert img.min() < 255  # something was drawn (labels at least)
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(tmp_path / "with" / "model" / "unet")
    b = UNet2DConditionModel.from_pretrained(tmp_path / "without" / "model" / "unet")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_snapshots_are_the_ema_model_at_their_step_and_leave_training_untouched(tmp_path):
    """train.snapshots: a model folder at each listed step, equal to the final model of a run stopped there;
    the run that wrote them ends with the same weights as one that did not."""
    from diffusers import UNet2DConditionModel

    data, acfg = _data(tmp_path)
    train(replace(CFG, snapshots=(2, 4)), data, acfg, tmp_path / "snap")
    train(CFG, data, acfg, tmp_path / "plain")
    train(replace(CFG, steps=4), data, acfg, tmp_path / "four")
    assert sorted(p.name for p in (tmp_path / "snap" / "snapshots").iterdir()) == ["step-2", "step-4"]
    load = lambda p: UNet2DConditionModel.from_pretrained(p / "unet")  # noqa: E731
    for a, b in ((tmp_path / "snap" / "snapshots" / "step-4", tmp_path / "four" / "model"),
                 (tmp_path / "snap" / "model", tmp_path / "plain" / "model")):
        for pa, pb in zip(load(a).parameters(), load(b).parameters()):
            assert torch.equal(pa, pb)


def test_train_repurposes_a_4_channel_prior(tmp_path):
    """`train.model.pretrained` = a pretrain2d folder: trains on 16-channel atlases with the text encoder frozen."""
    from gaussian_atlas.pretrain2d import pretrain2d

    images = torch.rand(4, 4, 8, 8) * 2 - 1
    prior = TrainConfig(model=ModelConfig(channels=4, sample_size=8, max_length=8), steps=2, batch_size=2,
                        checkpoint_every=2)
    pretrain2d(prior, images, ["a red cube", "a blue cone", "a green torus", "a red cone"], tmp_path / "prior")
    data, acfg = _data(tmp_path)
    cfg = replace(CFG, steps=2, model=ModelConfig(pretrained=str(tmp_path / "prior" / "model"), sample_size=8,
                                                  max_length=8))
    s = train(cfg, data, acfg, tmp_path / "run")
    assert s["step"] == 2 and torch.isfinite(torch.tensor(s["last_loss"]))
    from transformers import CLIPTextModel

    te0 = CLIPTextModel.from_pretrained(tmp_path / "prior" / "model" / "text_encoder")
    te1 = CLIPTextModel.from_pretrained(tmp_path / "run" / "model" / "text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(te0.parameters(), te1.parameters()))  # frozen, as SD's CLIP


def test_checkpoints_of_other_data_or_settings_are_not_resumed(tmp_path):
    """A rerun on changed atlases (or a changed learning rate) trains afresh; more steps or other logging
    settings resume. extra.pt loads with weights_only=True (no pickled code)."""
    from diffusers import UNet2DConditionModel

    data, acfg = _data(tmp_path)
    train(CFG, data, acfg, tmp_path / "a")
    extra = torch.load(latest_checkpoint(tmp_path / "a") / "extra.pt", weights_only=True)
    assert extra["step"] == 6 and extra["run_key"]
    changed = replace(data, atlases=data.atlases + 0.5)
    s = train(CFG, changed, acfg, tmp_path / "a")  # the same folder, new data: not "already at step 6"
    assert s["step"] == 6 and s["stopped"] == "steps"
    train(CFG, changed, acfg, tmp_path / "b")
    load = lambda p: UNet2DConditionModel.from_pretrained(p / "model" / "unet")  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(load(tmp_path / "a").parameters(), load(tmp_path / "b").parameters()))
    # longer, with other logging: resumes from step 6 (only 2 more steps run)
    logs = []
    train(replace(CFG, steps=8, log_every=2), changed, acfg, tmp_path / "b", log=lambda k, m: logs.append(k))
    assert logs == [8]
    train(replace(CFG, lr=5e-4), changed, acfg, tmp_path / "b", log=lambda k, m: logs.append(k))  # other lr: afresh
    assert logs[1:] == [1, 2, 3, 4, 5, 6]


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path):
    import pickle

    import pytest

    data, acfg = _data(tmp_path)
    train(replace(CFG, steps=2), data, acfg, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = latest_checkpoint(tmp_path / "run")
    with open(ckpt / "extra.pt", "wb") as fh:
        pickle.dump({"step": 2, "run_key": Evil()}, fh)
    with pytest.raises(ValueError, match="refused.*weights_only"):
        train(replace(CFG, steps=4), data, acfg, tmp_path / "run")
    assert not marker.exists()
