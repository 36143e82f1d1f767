"""benchmarks/log_transfer_run.py: one MLflow run per arm and seed, with per-step losses and checkpoint scores;
benchmarks/report_transfer.py: the pooled table, the paired difference and the pictures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _arm(root: Path, arm: str, seed: int, right: list[bool]) -> None:
    """A finished arm: 2 checkpoints, 2 prompts (1 seen, 1 held out) x 2 samples; ``right``: both_correct per sample."""
    d = root / "arms" / f"{arm}-s{seed}"
    d.mkdir(parents=True)
    rows = []
    for step in (10, 20):
        for src in ("generated", "ceiling", "floor"):
            for i, (prompt, held) in enumerate((("a red cube", False), ("a green torus", True))):
                for k in range(2):
                    ok = right[2 * i + k] if src == "generated" else src == "ceiling"
                    rows.append({"index": i, "sample": k, "prompt": prompt, "kind": "single", "held_out": held,
                                 "source": src, "both_correct": ok, "colour_correct": True, "shape_correct": ok})
        pd.DataFrame(rows[-12:]).to_csv(d / f"scores_step{step}.csv", index=False)
        np.savez_compressed(d / f"views_step{step}.npz", views=np.full((2, 2, 8, 8, 3), 200, np.uint8))
    scores = {str(s): {"generated": {"seen": {"both_accuracy": 0.5, "both_accuracy_ci95": [0.0, 1.0]}}} for s in (10, 20)}
    args = {"steps": 20, "batch": 4, "lr": 1e-4, "warmup": 0, "size": "tiny", "side": 8, "eval_prompts": [1, 1, 0],
            "eval_samples": 2, "eval_views": 2, "objects": 4, "holdout": [1, 0]}
    (d / "result.json").write_text(json.dumps({"args": args, "arm": arm, "seed": seed, "snapshots": [10, 20],
                                               "scores": scores, "evaluate_config": {},
                                               "prompts": [{"prompt": "a red cube", "kind": "single", "held_out": False},
                                                           {"prompt": "a green torus", "kind": "single", "held_out": True}]}))
    (d / "history.jsonl").write_text("".join(json.dumps({"step": s, "time": 0.0, "loss_v": 1.0 / s}) + "\n"
                                             for s in (5, 10, 15, 20)))


def test_report_pools_seeds_and_pairs_the_difference(tmp_path):
    root = tmp_path / "w"
    _arm(root, "repurposed", 0, [True, True, True, True])
    _arm(root, "repurposed", 1, [True, True, True, False])
    _arm(root, "scratch", 0, [False, False, False, False])
    res = _load("report_transfer").report(root, tmp_path / "docs")
    r = res["arms"]["repurposed"][20]
    assert r["n_runs"] == 2 and r["seen"]["both"]["n"] == 4 and r["seen"]["both"]["mean"] == 1.0
    assert r["held-out"]["both"]["mean"] == 0.75 and r["v_loss"] == [0.05, 0.05]  # logged steps in (0.9 k, k]
    assert res["arms"]["scratch"][20]["seen"]["both"]["mean"] == 0.0
    d = res["difference"][20]["held-out"]["both"]
    assert d["mean"] == 0.75 and d["n_prompts"] == 1
    assert res["reference"]["ceiling"]["seen"]["both"]["mean"] == 1.0
    assert res["reference"]["floor"]["held-out"]["both"]["mean"] == 0.0
    table = (tmp_path / "docs" / "table.md").read_text()
    assert "| repurposed (2 seeds) | 20 |" in table and "repurposed − scratch" in table
    assert (tmp_path / "docs" / "fig8.png").exists()


def test_every_arm_is_a_run_with_losses_and_checkpoint_scores(tmp_path, monkeypatch):
    import mlflow

    root = tmp_path / "w"
    _arm(root, "repurposed", 0, [True] * 4)
    _arm(root, "scratch", 0, [False] * 4)
    (root / "prior_history.jsonl").write_text(json.dumps({"step": 25, "loss_v": 0.5}) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    mod = _load("log_transfer_run")
    ids = mod.main([str(root), "--experiment", "t-claim"])
    client = mlflow.MlflowClient(uri)
    runs = {client.get_run(i).data.tags["gatlas.arm"]: client.get_run(i) for i in ids}
    assert set(runs) == {"repurposed", "scratch", "prior"}
    rep = runs["repurposed"]
    assert rep.data.params["arm"] == "repurposed" and rep.data.params["snapshots"] == "10,20"
    assert [(m.step, m.value) for m in client.get_metric_history(rep.info.run_id, "loss_v")] == \
        [(5, 0.2), (10, 0.1), (15, 1 / 15), (20, 0.05)]
    hist = client.get_metric_history(rep.info.run_id, "generated.seen.both_accuracy_ci95_high")
    assert [(m.step, m.value) for m in hist] == [(10, 1.0), (20, 1.0)]
    assert "scores" in {a.path for a in client.list_artifacts(rep.info.run_id)}
    with pytest.raises(SystemExit, match="already logged"):
        mod.main([str(root), "--experiment", "t-claim"])


def test_shipped_demo_model_record_logs_as_one_run(tmp_path, monkeypatch):
    """benchmarks/train_demo_model.py --log-mlflow: the shipped model's training config, per-step loss and
    model card become one MLflow run; a second logging of the same record is refused."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    mod = _load("train_demo_model")
    model = ROOT / "models" / "demo-prior"
    run_id = mod.log_mlflow(model, experiment="t-demo")
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    record = json.loads((model / "run.json").read_text())
    assert run.data.params["model.size"] == record["train_config"]["model"]["size"]
    assert int(run.data.params["steps"]) == record["summary"]["step"]
    hist = client.get_metric_history(run_id, "loss_v")
    assert len(hist) == len((model / "history.jsonl").read_text().splitlines()) and hist[-1].step == 4000
    assert {"README.md", "run.json"} <= {a.path for a in client.list_artifacts(run_id)}
    with pytest.raises(SystemExit, match="already logged"):
        mod.log_mlflow(model, experiment="t-demo")
