"""Skip gsplat's ~100 s CUDA JIT build on a fresh GPU machine by loading a saved build.

Set ``GSPLAT_PREBUILT=/path/to/gsplat_cuda.so`` (from
``~/.cache/torch_extensions/py312_cu130/gsplat_cuda/`` of an earlier run with the
same torch, CUDA and Python) before importing anything that imports gsplat.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def use_prebuilt_gsplat(path: str | None = None) -> bool:
    path = path or os.environ.get("GSPLAT_PREBUILT")
    if not path or not os.path.exists(path):
        return False
    import torch  # noqa: F401  (the saved build links against torch's libc10 / libtorch: load them first)

    spec = importlib.util.spec_from_file_location("gsplat_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    sys.modules["gsplat.csrc"] = mod
    return True
