"""benchmarks/log_gpu_run.py: a gpu_run.py folder goes into MLflow with its steps, scores and pictures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("log_gpu_run", ROOT / "benchmarks" / "log_gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_folder_is_logged_with_steps_scores_and_loss_plot(tmp_path, monkeypatch):
    import mlflow

    folder = tmp_path / "run"
    (folder / "previews").mkdir(parents=True)
    (folder / "evaluate").mkdir()
    (folder / "summary.json").write_text(json.dumps({"device": "TestGPU", "objects": 3, "fit_s": 1.5,
                                                     "train": {"step": 50, "config": {"lr": 2e-4}}}))
    rows = [{"step": s, "time": 1.0 + s, "loss_v": 1.0 / s, "lr": 1e-4, "samples_per_second": 10.0 + s}
            for s in (25, 50)]
    rows[0]["loss_rgb"] = 0.2
    (folder / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "evaluate" / "evaluate.json").write_text(json.dumps(
        {"generated": {"both_accuracy": 0.75, "n": 4}, "ceiling": {"both_accuracy": 0.9}, "floor": {"both_accuracy": 0.0}}))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "previews" / "step_000050.png")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the new experiment's artifacts go to ./mlruns
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    run_id = _load().main([str(folder), "--experiment", "t-gpu-run"])

    client = mlflow.MlflowClient(uri)
    hist = client.get_metric_history(run_id, "loss_v")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(25, 0.04), (50, 0.02)]
    run = client.get_run(run_id)
    assert run.data.metrics["generated.both_accuracy"] == 0.75
    assert run.data.params["train.config.lr"] == "0.0002"
    assert run.data.tags["gatlas.device"] == "TestGPU"
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss.png", "samples", "evaluate", "summary.json"} <= logged
    with Image.open(folder / "loss.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
