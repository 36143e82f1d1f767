"""The fit stage's settings and the records it passes around (``params.yaml: fit``).

:class:`FitConfig` (with :class:`DensifyConfig` for the plain representation and
:class:`AnchorConfig` for the anchor one), one object's training data
(:class:`FitInput`) and one object's result (:class:`FitResult`). ``CODE_VERSION``
is the fitter's explicit version in every fit's reuse key (:func:`gaussian_atlas.fit.store.config_hash`):
bump it when a change to the fitting code changes what a fit produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..gaussians import Gaussians

METHODS = ("plain", "anchors")
# Bump when a change of the fitting code (loop, views, losses, representations, strategies, renderer,
# PLY writer) changes the fits it produces: finished fits with another version are redone.
CODE_VERSION = 2  # 2: packed objects no longer see their neighbours (per-object render, far plane)


@dataclass(frozen=True)
class DensifyConfig:
    """gsplat ``DefaultStrategy`` settings (steps are fitting steps)."""

    prune_opa: float = 0.005
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    prune_scale3d: float = 0.1
    refine_start_iter: int = 100
    refine_stop_iter: int = 1500
    refine_every: int = 100
    reset_every: int = 3000
    absgrad: bool = False


@dataclass(frozen=True)
class AnchorConfig:
    """``params.yaml: fit.anchors``: the anchor fitter (used when ``fit.method: anchors``).

    n_offsets : k neural Gaussians per anchor (Scaffold-GS: 10).
    feat_dim : anchor feature size = MLP width (Scaffold-GS: 32).
    voxel_size : anchor grid side in world units (objects lie in the unit ball).
    lr_* : Adam learning rates; offsets and MLPs decay exponentially to ``*_final``.
    grow_grad2d : mean screen-space gradient above which a neural Gaussian proposes a new anchor.
    grow_levels : grid levels tried when growing (side voxel_size / 2^i, threshold grow_grad2d · 2^i).
    max_grow_fraction : at most this fraction of the current anchors is added per growing step.
    prune_opa : anchors whose neural Gaussians' summed opacity averages below this are removed.
    refine_start_iter, refine_stop_iter, refine_every : growing / pruning / bound at the steps
        ``refine_start_iter < step < refine_stop_iter`` with ``step % refine_every == 0``
        (gsplat DefaultStrategy's schedule, as ``fit.densify``).
    """

    n_offsets: int = 10
    feat_dim: int = 32
    voxel_size: float = 0.04
    lr_features: float = 0.0075
    lr_scaling: float = 0.007
    lr_offsets: float = 0.01
    lr_offsets_final: float = 0.0001
    lr_mlp: float = 0.004
    lr_mlp_final: float = 0.00004
    grow_grad2d: float = 0.0002
    grow_levels: int = 2
    max_grow_fraction: float = 0.25
    prune_opa: float = 0.005
    refine_start_iter: int = 50
    refine_stop_iter: int = 1500
    refine_every: int = 100

    def __post_init__(self) -> None:
        if self.n_offsets < 1 or self.feat_dim < 1 or self.voxel_size <= 0 or self.grow_levels < 0:
            raise ValueError("fit.anchors: n_offsets, feat_dim >= 1, voxel_size > 0, grow_levels >= 0")
        if self.refine_every < 1:
            raise ValueError("fit.anchors: refine_every must be >= 1")



@dataclass(frozen=True)
class FitConfig:
    """Parameters of the ``fit`` stage (``params.yaml: fit``).

    steps : optimisation steps per object.
    tau : the bound on Gaussians per object (paper: 36,864).
    init_points : initial Gaussians (surface samples when the object has them).
    views_per_step : training views rendered per object and step.
    holdout_every : every k-th view is held out for PSNR/SSIM (never trained on).
    measure_views : random training views per object used to rank visibility.
    lambda_* : loss weights (λ_lpips > 0 needs LPIPS weights on disk: ``lpips_weights``).
    batch_objects : objects fitted together (packed in space); 1 on CPU.
    resolution : fit at this image side (images are resized once); 0 = as rendered.
    method : ``"plain"`` (free Gaussians + gsplat densification + the visibility bound) or
        ``"anchors"`` (Scaffold-GS anchors with view-independent MLPs, baked after fitting:
        :mod:`gaussian_atlas.fit.anchors`, settings in ``anchors``). ``densify``, ``min_scale`` and the
        ``lr_*`` of free Gaussians apply to ``"plain"`` only.
    max_seconds : wall-clock budget of one :func:`~gaussian_atlas.fit.fit_objects` call (the whole batch);
        the loop stops after the step that reaches it (0 = no budget: ``steps`` steps).
    bound_rank : which Gaussians the bound removes first (``"plain"``):
        ``"visibility"`` (the paper's), ``"opacity"`` or ``"random"`` (ablation controls).
    min_scale : the smallest standard deviation a free Gaussian keeps (``"plain"``; unit-ball units): log-scales are
        clamped to ``log(min_scale)`` after every optimiser step. Without it the flattest axes keep shrinking, with
        or without the scale regulariser (a 1,500-step CPU fit of two objects at 64²: log-scale minimum -9.76 at step
        550 with ``lambda_reg`` 0.01, -9.77 with 0; -19.4 at the end), since Adam turns even a vanishing gradient
        into a step of ~``lr_scales`` and every split divides scales by 1.6. One such Gaussian made prune_check
        reject 13 % of the objects of the H100 end-to-end run ("degenerate scale" < 1e-7); a paper-length fit
        (20,000 steps) would underflow float32. A floor far below a pixel (gsplat's 0.3 px² screen-space dilation
        dominates any axis under ~1e-3 here) leaves the renders as they are.
    ssim_kernels : how the loss's SSIM runs (:func:`~gaussian_atlas.fit.losses.ssim`): ``"auto"`` (CUDA: the
        fused Triton SSIM, else the Triton blur, else conv2d; CPU: conv2d), ``"fused"`` (the whole SSIM in Triton kernels), ``"triton"``,
        ``"torch"``. The same value to float32 rounding.
    """

    steps: int = 1500
    tau: int = 36_864
    init_points: int = 4096
    init_opacity: float = 0.1
    views_per_step: int = 4
    holdout_every: int = 8
    measure_views: int = 8
    lr_means: float = 1.6e-4
    lr_means_final: float = 1.6e-6
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2.5e-3
    lambda_rgb: float = 0.8
    lambda_ssim: float = 0.2
    lambda_lpips: float = 0.0
    lambda_reg: float = 0.01
    lambda_mask: float = 0.1
    lpips_weights: str | None = None
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    batch_objects: int = 1
    resolution: int = 0
    spacing: float = 100.0
    seed: int = 0
    method: str = "plain"
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    max_seconds: float = 0.0
    bound_rank: str = "visibility"
    ssim_kernels: str = "auto"
    min_scale: float = 1e-5

    def __post_init__(self) -> None:
        from ..prune import BOUND_RANKS
        from ._ssim_window import SSIM_KERNELS

        if self.ssim_kernels not in SSIM_KERNELS:
            raise ValueError(f"fit: unknown ssim_kernels {self.ssim_kernels!r}; choose one of {SSIM_KERNELS}")

        if self.bound_rank not in BOUND_RANKS:
            raise ValueError(f"fit: unknown bound_rank {self.bound_rank!r}; choose one of {BOUND_RANKS}")
        if self.tau < 1 or self.steps < 1 or self.views_per_step < 1 or self.holdout_every < 2:
            raise ValueError("fit: tau, steps, views_per_step must be >= 1 and holdout_every >= 2")
        if self.method not in METHODS:
            raise ValueError(f"fit: unknown method {self.method!r}; choose one of {METHODS}")
        if not self.min_scale > 0:
            raise ValueError(f"fit: min_scale must be > 0, got {self.min_scale}")
        if self.max_seconds < 0:
            raise ValueError(f"fit: max_seconds must be >= 0, got {self.max_seconds}")


@dataclass
class FitInput:
    """One object's training data (see :func:`gaussian_atlas.data.load_object`)."""

    id: str
    rgb: np.ndarray  # [V, H, W, 3] float32 in [0, 1], on white
    alpha: np.ndarray  # [V, H, W] float32
    c2w: np.ndarray  # [V, 4, 4] OpenGL camera-to-world
    K: np.ndarray  # [V, 3, 3] pixels
    surface_points: np.ndarray | None = None  # [P, 3]
    surface_colors: np.ndarray | None = None  # [P, 3] in [0, 1]
    surface_normals: np.ndarray | None = None  # [P, 3] unit

    @classmethod
    def from_loaded(cls, obj_id: str, o: dict[str, np.ndarray]) -> "FitInput":
        """From the dict of :func:`gaussian_atlas.data.load_object`."""
        return cls(obj_id, o["rgb"], o["alpha"], o["c2w"], o["K"], o.get("surface_points"), o.get("surface_colors"),
                   o.get("surface_normals"))


@dataclass
class FitResult:
    id: str
    gaussians: Gaussians  # [N] on CPU, with visibility
    metrics: dict[str, Any]
    model: Any = None  # method "anchors": the object's AnchorModel (at the origin, on CPU) the Gaussians were baked from
