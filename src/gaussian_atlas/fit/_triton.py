"""triton for the fit's kernels (:mod:`._blur_triton`, :mod:`._ssim_triton`), imported once and guarded: the
package imports on machines without triton (CI); :func:`available` says whether it imported."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a triton that does not fit this torch
    triton = tl = None


def available() -> bool:
    """Whether triton imported (the kernels are compiled on first use)."""
    return triton is not None
