"""Pixel-wise standardisation of Gaussian atlases (paper Sec. 5).

The UNet was trained on VAE latents, roughly N(0, 1) per value; atlases are not. The
paper "standardize[s] the 2D atlases using the pixel-wise mean and standard deviation
computed from the entire GaussianVerse": one mean and one std **per channel and pixel**,
i.e. two ``[16, S, S]`` arrays, computed here in one streaming pass over any number of
atlases (:class:`RunningStats`), then applied by :func:`normalize` / :func:`denormalize`.

Accumulation is float64 with Chan et al.'s parallel update of (count, mean, M2), so
batches, shards or workers can be merged in any order with the same result as a single
pass (T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm
for computing sample variances", 1979; Welford 1962 for one value at a time)::

    n = n_a + n_b,  d = mean_b - mean_a
    mean = mean_a + d n_b / n
    M2   = M2_a + M2_b + d² n_a n_b / n

``std`` is the population std ``sqrt(M2 / n)`` (numpy's default, ``ddof=0``), floored at
``std_floor``.

Why ``std_floor = 1e-3`` by default
-----------------------------------
Pixels whose value hardly varies over the dataset (a channel that is constant at a pixel,
float32 rounding noise ~1e-7 on values of order 1) would otherwise be divided by ~0 and
blow tiny noise up to huge standardised values. The floor bounds that gain to 1000x, and
it sits below every quantum that matters when decoding: 1/255 ≈ 4e-3 for colours and for
the opacity renderers cull, and ~1e-3 of the unit sphere for offsets (0.06 pixel of a
128-pixel render). So a floored pixel's decoding error (floor x the model's error in
standardised units, <= 1) stays below what anyone can see, while every channel that really
varies (std >> 1e-3) is standardised exactly as without a floor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .io import write_npz

__all__ = ["DEFAULT_STD_FLOOR", "NormalizeConfig", "RunningStats", "normalize", "denormalize"]

DEFAULT_STD_FLOOR = 1e-3


@dataclass(frozen=True)
class NormalizeConfig:
    """``params.yaml: normalize``: the ``normalize`` stage.

    std_floor : no pixel's std is below this (no division by ~0).
    min_atlases : fewer atlases than this fail the statistics' validation.
    batch : atlases read and merged into the running moments at a time.
    """

    std_floor: float
    min_atlases: int
    batch: int

    def __post_init__(self) -> None:
        if not self.std_floor > 0 or self.min_atlases < 1 or self.batch < 1:
            raise ValueError(f"normalize: std_floor must be > 0 and min_atlases, batch >= 1, got {self}")


def _np64(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


class RunningStats:
    """Streaming pixel-wise mean / std of atlases ``[C, H, W]`` (C = 16), float64.

    Parameters
    ----------
    std_floor : float
        :attr:`std` is at least this (see the module docstring: 1e-3).

    Examples
    --------
    >>> rs = RunningStats()
    >>> for batch in loader:            # doctest: +SKIP
    ...     rs.update(batch)            # [B, 16, S, S]
    >>> x = normalize(atlas, rs)        # doctest: +SKIP
    """

    def __init__(self, std_floor: float = DEFAULT_STD_FLOOR):
        if not std_floor > 0:
            raise ValueError(f"std_floor must be > 0, got {std_floor}")
        self.std_floor = float(std_floor)
        self.count = 0
        self._mean: np.ndarray | None = None  # [C, H, W] float64
        self._m2: np.ndarray | None = None  # [C, H, W] float64, sum of squared deviations

    # ---- accumulation ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of one atlas, ``None`` before the first update."""
        return None if self._mean is None else tuple(self._mean.shape)

    def _merge_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        if mean_b.shape != self._mean.shape:
            raise ValueError(f"atlas shape {list(mean_b.shape)} does not match the stats' {list(self._mean.shape)}")
        n_a = self.count
        n = n_a + n_b
        d = mean_b - self._mean
        self._mean = self._mean + d * (n_b / n)
        self._m2 = self._m2 + m2_b + d * d * (n_a * n_b / n)
        self.count = n

    def update(self, batch: Tensor | np.ndarray) -> "RunningStats":
        """Add a batch ``[B, C, H, W]`` (or one atlas ``[C, H, W]``); numpy or torch, any float dtype.

        Raises ``ValueError`` on a wrong rank, a shape other than the earlier ones, or
        non-finite values (one NaN would poison every later mean).
        """
        x = _np64(batch)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"update expects [B, C, H, W] or [C, H, W], got {list(x.shape)}")
        if x.shape[0] == 0:
            return self
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise ValueError(f"batch has {bad} non-finite values")
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        self._merge_moments(int(x.shape[0]), mean_b, m2_b)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold another accumulator in (e.g. from another shard or worker); returns ``self``."""
        if other._mean is not None:
            self._merge_moments(other.count, other._mean, other._m2)  # type: ignore[arg-type]
        return self

    @classmethod
    def from_batches(cls, batches: Iterable[Tensor | np.ndarray], std_floor: float = DEFAULT_STD_FLOOR) -> "RunningStats":
        """One pass over an iterable of batches."""
        rs = cls(std_floor)
        for b in batches:
            rs.update(b)
        return rs

    # ---- results -----------------------------------------------------------------------
    def _need(self) -> None:
        if self._mean is None or self.count == 0:
            raise ValueError("RunningStats is empty: update() it with atlases first")

    @property
    def mean(self) -> np.ndarray:
        """``[C, H, W]`` float64 pixel-wise mean."""
        self._need()
        return self._mean.copy()  # type: ignore[union-attr]

    @property
    def var(self) -> np.ndarray:
        """``[C, H, W]`` float64 population variance ``M2 / count`` (not floored)."""
        self._need()
        return self._m2 / self.count  # type: ignore[operator]

    @property
    def std(self) -> np.ndarray:
        """``[C, H, W]`` float64 population std, floored at :attr:`std_floor`."""
        return np.maximum(np.sqrt(self.var), self.std_floor)

    def floored_fraction(self) -> float:
        """Share of (channel, pixel) entries whose std was raised to the floor."""
        return float((np.sqrt(self.var) < self.std_floor).mean())

    def summary(self, channel_names: Iterable[str] | None = None) -> dict[str, float]:
        """Per-channel averages of the pixel-wise mean and std, plus count and floored fraction (for MLflow)."""
        mean, std = self.mean, self.std
        names = list(channel_names) if channel_names is not None else [str(c) for c in range(mean.shape[0])]
        out: dict[str, float] = {"count": float(self.count), "floored_fraction": self.floored_fraction()}
        for c, name in enumerate(names[: mean.shape[0]]):
            out[f"mean/{name}"] = float(mean[c].mean())
            out[f"std/{name}"] = float(std[c].mean())
        return out

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mean``, ``std`` (floored), ``m2``, ``count`` and ``std_floor`` to an npz, atomically.

        ``m2`` and ``count`` make a loaded accumulator mergeable again; ``mean``/``std``
        are what consumers (training, sampling) read.
        """
        self._need()
        return write_npz(path, mean=self._mean, std=self.std, m2=self._m2,
                         count=np.asarray(self.count, dtype=np.int64),
                         std_floor=np.asarray(self.std_floor, dtype=np.float64))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunningStats":
        """Read what :meth:`save` wrote."""
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mean", "m2", "count", "std_floor") if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a RunningStats file, missing {missing}")
            rs = cls(float(z["std_floor"]))
            rs.count = int(z["count"])
            rs._mean = z["mean"].astype(np.float64)
            rs._m2 = z["m2"].astype(np.float64)
        if rs._mean.shape != rs._m2.shape or rs.count < 1:
            raise ValueError(f"{path}: inconsistent stats (shapes {rs._mean.shape}/{rs._m2.shape}, count {rs.count})")
        return rs

    def __repr__(self) -> str:
        return f"RunningStats(count={self.count}, shape={self.shape}, std_floor={self.std_floor})"


def _stats_like(stats: RunningStats, x: Any) -> tuple[Any, Any]:
    mean, std = stats.mean, stats.std
    if tuple(x.shape[-3:]) != mean.shape:
        raise ValueError(f"atlas shape {list(x.shape)} does not end in the stats' {list(mean.shape)}")
    if isinstance(x, Tensor):
        return (torch.as_tensor(mean, dtype=x.dtype, device=x.device),
                torch.as_tensor(std, dtype=x.dtype, device=x.device))
    dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    return mean.astype(dt), std.astype(dt)


def normalize(atlas: Tensor | np.ndarray, stats: RunningStats) -> Tensor | np.ndarray:
    """``(atlas - mean) / std`` pixel-wise; ``atlas`` ``[..., C, H, W]``, numpy or torch (dtype/device kept)."""
    x = atlas if isinstance(atlas, Tensor) else np.asarray(atlas)
    mean, std = _stats_like(stats, x)
    return (x - mean) / std


def denormalize(atlas: Tensor | np.ndarray, stats: RunningStats) -> Tensor | np.ndarray:
    """``atlas * std + mean`` pixel-wise: the inverse of :func:`normalize`."""
    x = atlas if isinstance(atlas, Tensor) else np.asarray(atlas)
    mean, std = _stats_like(stats, x)
    return x * std + mean
