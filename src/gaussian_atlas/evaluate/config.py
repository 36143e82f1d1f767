"""The evaluation's settings (``params.yaml: evaluate``) and the three sources every score is computed for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..sample import SampleConfig


SOURCES = ("generated", "ceiling", "floor")


@dataclass(frozen=True)
class EvaluateConfig:
    """``params.yaml: evaluate``.

    prompts : a text file with one prompt per line (``#`` comments), or None for the
        built-in benchmark prompts (:func:`benchmark_prompts`).
    n_seen, n_held_out, n_compositions : the built-in prompts: single-part captions seen
        in training, shape x colour combinations never seen in training (neither alone nor
        as a part), and two-part compositions (alternately seen and new). Paper: 100 prompts.
    samples_per_prompt : objects generated per prompt (sampling seeds); the ceiling and the
        floor get as many. Confidence intervals resample prompts, then samples within them.
    n_bootstrap : bootstrap resamples of the 95 % confidence intervals.
    n_views : random views per prompt (paper: 10).
    resolution : side of the evaluation views in pixels.
    elevation_min_deg, elevation_max_deg, radius, fov_deg : the random views (azimuth
        uniform in [0, 360), elevation uniform in the range; the object is in the unit ball).
    seed : seed of the prompt choice, the views and the random (floor) atlases.
    sample : the sampler (:class:`gaussian_atlas.sample.SampleConfig`: steps, guidance,
        batch size, the generation seed, turntable frames/resolution).
    min_opacity : Gaussians under this opacity are not shape evidence.
    shape_points : Gaussian centres drawn per object (by opacity) for the Chamfer distance.
    rotations : turns about +Z tried per candidate.
    clip_model : local CLIP folder (transformers layout) or None (-> skipped).
    vqa_model : local folder with t2v_metrics' CLIP-FlanT5 weights (its ``cache_dir``) or None.
    vqa_name : the t2v_metrics model name.
    device : "auto" | "cpu" | "cuda".
    """

    prompts: str | None = None
    n_seen: int = 6
    n_held_out: int = 4
    n_compositions: int = 2
    samples_per_prompt: int = 4
    n_bootstrap: int = 2000
    n_views: int = 10
    resolution: int = 128
    elevation_min_deg: float = 0.0
    elevation_max_deg: float = 45.0
    radius: float = 2.8
    fov_deg: float = 45.0
    seed: int = 0
    sample: SampleConfig = field(default_factory=SampleConfig)
    min_opacity: float = 0.05
    shape_points: int = 1024
    rotations: int = 24
    clip_model: str | None = None
    vqa_model: str | None = None
    vqa_name: str = "clip-flant5-xxl"
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.sample, Mapping):
            object.__setattr__(self, "sample", SampleConfig(**self.sample))
        for k in ("n_seen", "n_held_out", "n_compositions"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.samples_per_prompt < 1 or self.n_bootstrap < 100:
            raise ValueError(f"samples_per_prompt must be >= 1 and n_bootstrap >= 100, got {self.samples_per_prompt}, "
                             f"{self.n_bootstrap}")
        if self.n_views < 1 or self.resolution < 8:
            raise ValueError(f"n_views must be >= 1 and resolution >= 8, got {self.n_views}, {self.resolution}")
        if not self.elevation_min_deg <= self.elevation_max_deg:
            raise ValueError("elevation_min_deg must be <= elevation_max_deg")
        if self.rotations < 1 or self.shape_points < 16:
            raise ValueError(f"rotations must be >= 1 and shape_points >= 16, got {self.rotations}, "
                             f"{self.shape_points}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def torch_device(self) -> torch.device:
        from ..config import resolve_device

        return torch.device(resolve_device(self.device))
