"""A stage killed with -9 leaves its MLflow run RUNNING; the next run of that stage closes it as KILLED."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_stage_run_is_closed_by_the_next(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}
    env.pop("GATLAS_MLFLOW_PARENT_RUN_ID", None)
    script = textwrap.dedent("""
        import os, signal
        from stages.common import stage_run
        with stage_run("fit", {"steps": 1}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == -9
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gaussian-atlas")
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "RUNNING"
    ok = subprocess.run([sys.executable, "-c", "from stages.common import stage_run\nwith stage_run('fit', {}): pass"],
                        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert "was gone" in runs[killed.info.run_id].data.tags["gatlas.closed_by"]
    assert sorted(r.info.status for r in runs.values()) == ["FINISHED", "KILLED"]


def test_experiments_open_on_the_training_runs_page(tmp_path, monkeypatch):
    import mlflow

    from stages.common import setup_mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    old = mlflow.create_experiment("made-before")  # an experiment made before the tag existed gets it too
    for name in ("fresh", "made-before"):
        exp_id = setup_mlflow(name)
        assert mlflow.MlflowClient().get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp_id == old


def test_the_project_store_keeps_artifacts_in_mlflow_artifacts_not_mlruns(tmp_path, monkeypatch):
    """Unset, or set to the project's store (as the flow's stages inherit it), MLFLOW_TRACKING_URI gives the
    experiment ``<repo>/mlflow/artifacts`` as its artifact location: no ``mlruns/`` in the working directory."""
    import mlflow

    import stages.common as common

    old = mlflow.get_tracking_uri()
    repo, cwd = tmp_path / "repo", tmp_path / "cwd"
    (repo / "mlflow").mkdir(parents=True)
    (repo / "params.yaml").write_text("mlflow: {experiment: project-store}\n")
    cwd.mkdir()
    monkeypatch.setattr(common, "ROOT", repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset below; restored after the test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(cwd)
    (cwd / "a.txt").write_text("a")
    try:
        for _ in range(2):  # the second time MLFLOW_TRACKING_URI is set: by set_tracking_uri, as in a flow's stage
            with common.stage_run("ingest", {}) as run:
                mlflow.log_artifact(str(cwd / "a.txt"))
            assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
            exp = mlflow.MlflowClient().get_experiment(run.info.experiment_id)
            assert exp.artifact_location == (repo / "mlflow" / "artifacts").as_uri()
            assert (repo / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "a.txt").exists()
            mlflow.MlflowClient().rename_experiment(exp.experiment_id, f"old-{exp.experiment_id}")  # made again next
        assert not (cwd / "mlruns").exists() and not (repo / "mlruns").exists()
    finally:
        mlflow.set_tracking_uri(old)
