"""Real kill -9 mid-run (a subprocess, killed at points drawn at random), then a rerun: no partial output is
read, finished work is not redone, and the result equals a run that was never killed (bit-identical: these
CPU computations are deterministic; the fits run on one thread, since the CPU rasteriser's parallel reductions
differ in the last bits from run to run with more)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "PYTHONUNBUFFERED": "1"}


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` first holds; False if it finished first."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None or time.time() - t0 > timeout:
            return False
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


ATLAS = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from gaussian_atlas.atlas import AtlasConfig, write_atlases
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    items = [{"id": p.stem, "src": str(p), "shard": "s", "caption": ""} for p in sorted(src.glob("*.ply"))]
    write_atlases(items, AtlasConfig(side=16, method="scipy", cache_dir=str(out / "cache")), out, batch=1,
                  progress=False)
""")


def _plys(d: Path, n: int = 10) -> None:
    from gaussian_atlas.gaussians import Gaussians, write_ply

    d.mkdir(parents=True)
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        write_ply(d / f"obj{k:02d}.ply", Gaussians(
            means=torch.randn(200, 3, generator=g) * 0.4, quats=torch.randn(200, 4, generator=g),
            log_scales=torch.full((200, 3), -3.0), opacity_logits=torch.randn(200, generator=g),
            sh0=torch.randn(200, 3, generator=g) * 0.3))


def test_atlas_killed_mid_run_resumes_to_the_same_atlases(tmp_path):
    _plys(tmp_path / "plys")
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-c", ATLAS, str(tmp_path / "plys"), str(straight)], env=ENV, check=True)
    ref = {p.name: np.load(p)["atlas"] for p in (straight / "atlases" / "s").glob("*.npz")}
    assert len(ref) == 10
    rng = random.Random(0)
    for trial in range(2):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([sys.executable, "-c", ATLAS, str(tmp_path / "plys"), str(out)], env=ENV)
        done_dir = out / "atlases" / "s"
        killed = _kill_when(proc, lambda: done_dir.is_dir() and len(list(done_dir.glob("*.npz"))) >= 2,
                            rng.uniform(0.0, 0.3))
        before = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("[!.]*.npz")}
        for p in done_dir.glob("[!.]*.npz"):  # whatever exists under its name is complete (atomic writes)
            np.load(p)["atlas"]
        subprocess.run([sys.executable, "-c", ATLAS, str(tmp_path / "plys"), str(out)], env=ENV, check=True)
        after = {p.name: p for p in done_dir.glob("[!.]*.npz")}
        assert sorted(after) == sorted(ref)
        for name, p in after.items():
            np.testing.assert_array_equal(np.load(p)["atlas"], ref[name])
            if name in before:  # finished before the kill: not redone
                assert p.stat().st_mtime_ns == before[name]
        assert killed or trial  # at least the first trial really killed it mid-run
        assert not [p for p in done_dir.iterdir() if p.name.startswith(".")]  # a killed write's temp is gone


TRAIN = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_train import CFG, _data
    from dataclasses import replace
    from gaussian_atlas.train import train
    tmp = Path(sys.argv[1])
    data, acfg = _data(tmp)
    train(replace(CFG, steps=8, checkpoint_every=2, keep_checkpoints=2), data, acfg, tmp / "run")
""")


def test_train_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    unit = str(ROOT / "tests" / "unit")
    (tmp_path / "straight").mkdir()
    subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "straight"), unit], env=ENV, check=True)
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "run" / "model" / "unet")
    rng = random.Random(1)
    for trial in range(2):
        work = tmp_path / f"killed{trial}"
        work.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(work), unit], env=ENV)
        run = work / "run"
        first = 2 if trial == 0 else 4
        _kill_when(proc, lambda: (run / f"checkpoint-{first}" / "extra.pt").exists(), rng.uniform(0.0, 0.5))
        assert not (run / "model").exists() or trial  # killed before the end (the first trial at least)
        subprocess.run([sys.executable, "-c", TRAIN, str(work), unit], env=ENV, check=True)
        got = UNet2DConditionModel.from_pretrained(run / "model" / "unet")
        for (n, a), b in zip(ref.named_parameters(), got.parameters()):
            assert torch.equal(a, b), n


FIT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from gaussian_atlas.data import load_manifest
    from gaussian_atlas.fit import DensifyConfig, FitConfig, fit_chunk
    ing, out = sys.argv[1], sys.argv[2]
    items = load_manifest(ing)[["id", "path", "shard"]].to_dict("records")
    cfg = FitConfig(steps=15, tau=150, init_points=100, views_per_step=2, holdout_every=4, measure_views=2,
                    densify=DensifyConfig(refine_start_iter=100))
    fit_chunk(items, ing, out, cfg, device="cpu")
""")


def test_fit_killed_mid_run_resumes_to_the_same_fits(tmp_path):
    import json

    from tests.conftest import make_ingested
    from gaussian_atlas.gaussians import read_ply

    ing = str(make_ingested(tmp_path, n_objects=5) / "ing")
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-c", FIT, ing, str(straight)], env=ENV, check=True)
    ref = {p.name: read_ply(p) for p in straight.glob("objects/*/*.ply")}
    assert len(ref) == 5
    rng = random.Random(2)
    for trial in range(2):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([sys.executable, "-c", FIT, ing, str(out)], env=ENV)
        killed = _kill_when(proc, lambda: len(list(out.glob("objects/*/*.json"))) >= 1 + trial,
                            rng.uniform(0.0, 0.5))
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("objects/*/[!.]*.*")}
        for p in out.glob("objects/*/[!.]*.json"):  # whatever exists under its name is complete (atomic writes)
            json.loads(p.read_text())
        for p in out.glob("objects/*/[!.]*.ply"):
            read_ply(p)
        subprocess.run([sys.executable, "-c", FIT, ing, str(out)], env=ENV, check=True)
        after = {p.name: p for p in out.glob("objects/*/[!.]*.ply")}
        assert sorted(after) == sorted(ref)
        for name, p in after.items():
            g, r = read_ply(p), ref[name]
            for a, b in ((g.means, r.means), (g.log_scales, r.log_scales), (g.sh0, r.sh0), (g.visibility, r.visibility)):
                assert torch.equal(a, b), name
        for p in out.glob("objects/*/[!.]*.*"):
            if p.name in before:  # finished before the kill: not redone
                assert p.stat().st_mtime_ns == before[p.name], p.name
        assert killed or trial  # at least the first trial really killed it mid-run
        assert not [p for p in out.glob("objects/*/.*")]  # a killed write's temp is gone or never named
