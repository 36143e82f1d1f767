"""A 2D text-to-image prior, trained the way the paper's Stable Diffusion prior was: on captioned images.

The paper repurposes a UNet pretrained on 2D images (SD: 4-channel latents) for 16-channel
Gaussian Atlases (Sec. 5, Sec. 6.2 "Learned knowledge in text-to-image diffusion models is
universally transferable"). No pretrained weights reach this project's machines, so the prior
is built here at small scale and the thesis is tested directly:

- **images, not atlases**: RGBA renders of procedural objects (:mod:`gaussian_atlas.procedural`),
  one view per image, at the atlas side, so a 2D image has the shape of an SD latent:
  ``[4, S, S]`` (RGB on white and alpha, scaled to [-1, 1]). The objects come from their own
  master seed (the stage refuses the 3D set's), and the singles cycle over **every** shape x
  colour pair, the pairs held out of the 3D training set included: what the 2D prior knows of
  "a green torus" is what could transfer to a prompt never seen in 3D.
- **the same UNet** as the atlas model (``train.model.size``) with 4 channels in and out, and
  the same from-config text encoder and word-level tokenizer, trained together by the same
  loop as the atlas model (:func:`gaussian_atlas.train.train`: v-prediction, caption dropout,
  EMA, accelerate), without the rendering losses, which need Gaussians.
- the result is a diffusers-layout folder (``unet/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``) that ``train.model.pretrained`` loads: the UNet is widened 4 -> 16 channels by
  the paper's rule (:func:`gaussian_atlas.model.widen_unet`) and the text encoder is frozen,
  as SD's CLIP is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .train import TrainConfig, TrainData

__all__ = ["Prior2dData", "render_prior_images", "load_images", "image_train_data", "pretrain2d", "sample_images",
           "image_sheet"]


@dataclass(frozen=True)
class Prior2dData:
    """``params.yaml: pretrain2d.data``: the captioned 2D images.

    n_objects : procedural objects rendered (singles cycle over all 108 shape x colour pairs:
        ``n_objects * (1 - composition_fraction) >= 108`` covers each at least once).
    views : images per object, each its own training example.
    composition_fraction : share of two-part stacks.
    seed : master seed of the 2D objects; must differ from ``generate.seed`` (other objects
        than the 3D set's).
    supersample : rays per pixel side.
    workers : render processes.
    """

    n_objects: int
    views: int
    composition_fraction: float
    seed: int
    supersample: int
    workers: int

    def __post_init__(self) -> None:
        if self.n_objects < 1 or self.views < 1:
            raise ValueError(f"pretrain2d.data: n_objects and views must be >= 1, got {self.n_objects}, {self.views}")


def _procedural_config(cfg: Prior2dData, side: int) -> Any:
    from .cameras import ViewConfig
    from .meshrender import RenderConfig
    from .procedural import ProceduralConfig

    n_ring = max(1, (cfg.views + 1) // 2)
    views = ViewConfig(n_views=cfg.views, n_ring=min(n_ring, cfg.views), resolution=side)
    return ProceduralConfig(n_objects=cfg.n_objects, composition_fraction=cfg.composition_fraction, seed=cfg.seed,
                            workers=cfg.workers, render=RenderConfig(supersample=cfg.supersample, views=views,
                                                                      n_surface_samples=16))


def render_prior_images(cfg: Prior2dData, side: int, out_root: str | os.PathLike, progress: bool = True) -> dict:
    """Render the 2D set to ``out_root`` (the procedural generator's resumable NeRF layout)."""
    from .procedural import generate_dataset

    return generate_dataset(_procedural_config(cfg, side), out_root, progress=progress)


def load_images(root: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """``(images [M, 4, S, S] in [-1, 1], captions [M])``: every view of every object under ``root``
    as its own example; RGB composited on white, then alpha (SD-latent-shaped)."""
    from PIL import Image

    root = Path(root)
    caps = {}
    for line in (root / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        caps[r["id"]] = r["caption"]
    images, captions = [], []
    for oid in sorted(caps):
        meta = json.loads((root / "objects" / oid / "transforms.json").read_text(encoding="utf-8"))
        for fr in meta["frames"]:
            rgba = np.asarray(Image.open(root / "objects" / oid / fr["file_path"]).convert("RGBA"), np.float32) / 255.0
            a = rgba[..., 3:]
            rgb = rgba[..., :3] * a + (1.0 - a)  # on white, as the fits see their views
            images.append(np.concatenate([rgb, a], -1).transpose(2, 0, 1) * 2.0 - 1.0)  # [4, S, S]
            captions.append(caps[oid])
    if not images:
        raise ValueError(f"{root}: no images to train the 2D prior on")
    return torch.from_numpy(np.stack(images)), captions


def image_train_data(images: torch.Tensor, captions: Sequence[str]) -> TrainData:
    """:class:`~gaussian_atlas.train.TrainData` of 2D images: no Gaussians, so no reference views
    (the rendering losses must be off) and identity statistics."""
    M, C, S, _ = images.shape
    return TrainData(atlases=images.float(), captions=list(captions), centers=torch.zeros(M, 3),
                     scales=torch.ones(M), ref_rgb=torch.zeros(M, 0, 1, 1, 3), ref_alpha=torch.zeros(M, 0, 1, 1),
                     ref_c2w=torch.zeros(M, 0, 4, 4), ref_K=torch.zeros(M, 0, 3, 3), mean=torch.zeros(C, S, S),
                     std=torch.ones(C, S, S), grid=torch.arange(S * S))


def pretrain2d(cfg: TrainConfig, images: torch.Tensor, captions: Sequence[str], out_dir: str | os.PathLike, *,
               log: Callable[[int, dict[str, float]], None] | None = None, progress: bool = False,
               stop_after: int | None = None) -> dict[str, Any]:
    """Train the 2D prior (resumable; the model goes to ``out_dir/model``).

    ``cfg``: the atlas training config with ``model.channels == images.shape[1]`` (4); its
    rendering losses and previews are switched off here (2D images have no Gaussians).
    """
    if cfg.model.pretrained:
        raise ValueError("pretrain2d builds its model from config: train.model.pretrained must not be set for it")
    if cfg.model.channels != images.shape[1]:
        raise ValueError(f"pretrain2d: model.channels {cfg.model.channels} != image channels {images.shape[1]}")
    cfg = replace(cfg, lambda_rgb=0.0, lambda_mask=0.0, lambda_lpips=0.0, render_every=0, sample_every=0)
    from .train import train

    return train(cfg, image_train_data(images, captions), None, out_dir, log=log, progress=progress,
                 stop_after=stop_after)


@torch.no_grad()
def sample_images(model_dir: str | os.PathLike, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20,
                  guidance: float = 3.5, device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 ``[P, S, S, 3]``: the 2D prior's samples for ``prompts``, RGB on white (alpha applied)."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from .sample import sample_atlases

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device).eval()
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    sched = DPMSolverMultistepScheduler.from_pretrained(model_dir, subfolder="scheduler")
    x = sample_atlases(unet, te, tok, sched, list(prompts), list(seeds), steps=steps, guidance=guidance,
                       batch_size=min(16, len(prompts)))  # [P, 4, S, S] in [-1, 1]
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    rgb, a = x[:, :3], x[:, 3:]
    img = rgb * a + (1 - a)  # alpha over white
    return (img.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def image_sheet(images: np.ndarray, labels: Sequence[str], ncols: int = 8, scale: int = 2) -> np.ndarray:
    """A labelled contact sheet of uint8 ``[P, S, S, 3]`` images, each enlarged ``scale`` times."""
    from .viz import contact_sheet

    big = [np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in images]
    return contact_sheet(big, [lab[:28] for lab in labels], ncols=ncols)
