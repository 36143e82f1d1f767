"""The pipeline run's tag per stage (``gatlas.stage.<name>``) says what the stage did: ran, up to date, or skipped
with the reason the stage printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_skip_reason_reads_only_the_stage_own_summary_line():
    from flows.pipeline import skip_reason

    assert skip_reason("pretrain2d", "pretrain2d: skipped (pretrain2d.enabled is false: no 2D prior (see docs))") \
        == "pretrain2d.enabled is false: no 2D prior (see docs)"
    assert skip_reason("pretrain2d", "pretrain2d: 10 steps, last v-loss 0.1") is None
    assert skip_reason("train", "pretrain2d: skipped (off)") is None
    assert skip_reason("fit", "Stage 'fit' didn't change, skipping") is None


@pytest.mark.slow
def test_a_skipped_stage_is_tagged_skipped_with_its_reason(tmp_path, prefect_harness, monkeypatch):
    import mlflow

    from flows.pipeline import pipeline

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "work.py").write_text("open('work.txt', 'w').write('done')\nprint('work: 1 object')\n")
    (proj / "prior.py").write_text("open('prior.txt', 'w').write('off')\n"
                                   "print('prior: skipped (prior.enabled is false: no prior (see docs))')\n")
    (proj / "dvc.yaml").write_text(json.dumps({"stages": {
        "work": {"cmd": f"{sys.executable} work.py", "deps": ["work.py"], "outs": ["work.txt"]},
        "prior": {"cmd": f"{sys.executable} prior.py", "deps": ["prior.py"], "outs": ["prior.txt"]}}}))
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=proj, check=True,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)

    first = pipeline(root=str(proj))
    skipped = "skipped (prior.enabled is false: no prior (see docs))"
    assert first["stages"] == {"work": "ran", "prior": skipped}
    tags = mlflow.MlflowClient(uri).get_run(first["mlflow_run_id"]).data.tags
    assert tags["gatlas.stage.work"] == "ran" and tags["gatlas.stage.prior"] == skipped
    again = pipeline(root=str(proj))
    assert again["stages"] == {"work": "up to date", "prior": "up to date"}
