"""What every benchmark's raw JSON records besides its timings: machine, versions, commit, command."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def run_facts() -> dict:
    """Machine, CPU count, Python/numpy/torch versions, git commit and the command line of this process."""
    import numpy as np

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    # a device session copies the tree without (or with stale) git metadata: the caller passes the commit
    commit = os.environ.get("GATLAS_COMMIT") or commit
    facts = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
             "python": platform.python_version(), "numpy": np.__version__, "commit": commit,
             "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        facts |= {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for mod in ("diffusers", "gsplat"):
        if mod in sys.modules:
            facts[mod] = getattr(sys.modules[mod], "__version__", None)
    return facts


def write_record(path: Path | None, result: dict) -> None:
    """``result`` with :func:`run_facts` as JSON at ``path``, written atomically (a reader polling a run that
    rewrites its record never sees half a file); nothing when None."""
    if path is not None:
        from gaussian_atlas.io import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps({**result, **run_facts()}, indent=2))
