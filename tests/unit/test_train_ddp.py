"""The training loop under DDP: 2 CPU processes (gloo) launched with torchrun.

Each rank records what it trained on and the weights it ends with; the test checks that
both ranks end with bit-identical UNet, EMA and text-encoder weights that moved from
initialisation, that the ranks drew different batches, that only the main process wrote
the final model (and nothing deadlocked), and that a run killed after a checkpoint resumes
to exactly the weights of the straight run with every rank continuing its own batch stream.

This file is also the worker: ``python -m torch.distributed.run --standalone --nproc_per_node 2
-m tests.unit.test_train_ddp <out>`` (run from the repository root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gaussian_atlas.model import ModelConfig
from gaussian_atlas.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CFG = TrainConfig(model=ModelConfig(sample_size=8, max_length=8), steps=4, batch_size=2, checkpoint_every=2,
                  keep_checkpoints=3, render_resolution=16, lr=1e-3)


def _worker(out: Path) -> None:
    """One rank: train straight, then killed-and-resumed; save what this rank saw to ``out/rank<r>.pt``."""
    import accelerate
    import diffusers.training_utils

    import gaussian_atlas.train as T
    from tests.unit.test_train import _data

    rec: dict = {"draws": [], "save_model": 0, "ema": None, "acc": None}

    class RecEMA(diffusers.training_utils.EMAModel):
        """Snapshots the raw weights it is stepped with (before _save_model copies EMA weights over them)."""

        def __init__(self, parameters, *a, **kw):
            parameters = list(parameters)
            super().__init__(parameters, *a, **kw)
            self.init = [p.detach().clone() for p in parameters]
            rec["ema"] = self

        def step(self, parameters):
            parameters = list(parameters)
            super().step(parameters)
            self.raw = [p.detach().clone() for p in parameters]

    class RecAccelerator(accelerate.Accelerator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            rec["acc"] = self

    render_loss, save_model = T._render_loss, T._save_model

    def rec_render_loss(x0, idx, *a, **kw):
        rec["draws"].append(idx.tolist())
        return render_loss(x0, idx, *a, **kw)

    def rec_save_model(*a, **kw):
        rec["save_model"] += 1
        return save_model(*a, **kw)

    diffusers.training_utils.EMAModel = RecEMA
    accelerate.Accelerator = RecAccelerator
    T._render_loss, T._save_model = rec_render_loss, rec_save_model

    rank = int(os.environ["RANK"])
    data, acfg = _data(out / f"cache{rank}")  # same synthetic data on every rank (seeded)
    result = {}
    for name, kw in [("straight", {}), ("killed", {"stop_after": 3}), ("resumed", {})]:
        rec["draws"], rec["save_model"] = [], 0
        summary = T.train(CFG, data, acfg, out / ("straight" if name == "straight" else "resumed"), **kw)
        acc, ema = rec["acc"], rec["ema"]
        result[name] = {
            "summary": summary, "draws": rec["draws"], "save_model": rec["save_model"],
            "process_index": acc.process_index, "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "init": ema.init, "raw": ema.raw, "ema": [p.detach().clone() for p in ema.shadow_params],
            "text_encoder": {k: v.detach().clone() for k, v in acc.unwrap_model(acc._models[1]).state_dict().items()},
        }
    torch.save(result, out / f"rank{rank}.pt")


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.timeout(180)
def test_two_cpu_processes_train_in_lockstep(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "tests.unit.test_train_ddp", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    for name in ("straight", "killed", "resumed"):
        a, b = r0[name], r1[name]
        assert (a["process_index"], b["process_index"]) == (0, 1)
        assert a["num_processes"] == b["num_processes"] == 2 and "MULTI_CPU" in a["distributed_type"]
        # DDP keeps the replicas in lockstep: identical raw, EMA and text-encoder weights on both ranks
        assert _equal(a["init"], b["init"]), name
        assert _equal(a["raw"], b["raw"]), name
        assert _equal(a["ema"], b["ema"]), name
        assert a["text_encoder"].keys() == b["text_encoder"].keys()
        assert all(torch.equal(v, b["text_encoder"][k]) for k, v in a["text_encoder"].items()), name
        # ... but each rank trains on its own batches (batch_rng seeded with seed + process_index)
        assert len(a["draws"]) == len(b["draws"]) > 0 and a["draws"] != b["draws"], name

    s0, s1 = r0["straight"], r1["straight"]
    assert s0["summary"]["step"] == s1["summary"]["step"] == CFG.steps and len(s0["draws"]) == CFG.steps
    # training is not a no-op: the weights and the EMA moved away from initialisation
    assert not _equal(s0["raw"], s0["init"]) and not _equal(s0["ema"], s0["init"])
    assert not _equal(s0["raw"], s0["ema"])
    # the final model is written by the main process only, once
    assert (s0["save_model"], s1["save_model"]) == (1, 0)
    assert (r0["killed"]["save_model"], r1["killed"]["save_model"]) == (0, 0)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "straight" / "model" / sub).is_dir()
    ckpt = tmp_path / "straight" / f"checkpoint-{CFG.steps}"
    assert (ckpt / "extra.pt").exists() and {f.name for f in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}

    # killed after 3 steps (checkpoint-2 survives), resumed: every rank continues its *own* batch
    # stream from step 3, and both end with exactly the weights of the straight run
    for r in (r0, r1):
        assert r["killed"]["summary"]["step"] == 3 and r["resumed"]["summary"]["step"] == CFG.steps
        assert r["resumed"]["draws"] == r["straight"]["draws"][2:]
        assert _equal(r["resumed"]["raw"], r["straight"]["raw"])
        assert _equal(r["resumed"]["ema"], r["straight"]["ema"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
