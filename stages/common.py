"""What every stage shim shares: params, telemetry off, MLflow runs, one-line failures.

MLflow is configured here, at the edge, never at import time of the library.
Tracking store: ``sqlite:///<repo>/mlflow/mlflow.db`` with artifacts under
``<repo>/mlflow/artifacts`` unless ``MLFLOW_TRACKING_URI`` says otherwise.

A stage started by the Prefect flow finds the flow's parent run id in
``GATLAS_MLFLOW_PARENT_RUN_ID`` and logs as its child; started alone
(``dvc repro ingest``) it opens a run of its own. Either way the run is tagged
with the stage name and the git commit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARENT_ENV = "GATLAS_MLFLOW_PARENT_RUN_ID"
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


# The fit stage's fan-out starts a temporary Prefect server. With a fresh PREFECT_HOME it first
# creates its database: ~30 s on the 2-core CPU machine, over Prefect's default start timeout (20 s).
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def telemetry_off() -> None:
    """Telemetry off (and Prefect's temporary-server start timeout raised) unless the environment says otherwise."""
    for k, v in {**TELEMETRY_OFF, **PREFECT_DEFAULTS}.items():
        os.environ.setdefault(k, v)


telemetry_off()


class StageError(RuntimeError):
    """A failure to report in one line (exit status 1), not as a traceback."""


def load_params(section: str | None = None, path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else ROOT / "params.yaml"
    with open(path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if section is None:
        return params
    if section not in params:
        raise StageError(f"{path}: no '{section}' section")
    return params[section] or {}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}"


# MLflow 3's UI opens an experiment on its GenAI pages unless the experiment says it trains models
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def setup_mlflow(experiment: str | None = None) -> str:
    """Point MLflow at the project store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = experiment or load_params().get("mlflow", {}).get("experiment", "gaussian-atlas")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = None
        if "MLFLOW_TRACKING_URI" not in os.environ:
            (ROOT / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
            artifact_location = (ROOT / "mlflow" / "artifacts").as_uri()
        try:
            return mlflow.create_experiment(experiment, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except Exception:  # created meanwhile by a parallel writer
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                raise
    for k, v in EXPERIMENT_TAGS.items():  # experiments made before the tag existed
        if exp.tags.get(k) != v:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
    mlflow.set_experiment(experiment_id=exp.experiment_id if exp else None)
    return exp.experiment_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def close_orphans(exp_id: str, stage: str) -> list[str]:
    """Mark as KILLED the runs of ``stage`` left RUNNING by a process of this host that no longer exists
    (a stage killed with -9 cannot close its own run); returns their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`gatlas.stage` = '{stage}'"
                              f" and tags.`gatlas.host` = '{host}'", max_results=100)
    closed = []
    for r in runs:
        pid = r.data.tags.get("gatlas.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(r.info.run_id, "gatlas.closed_by", f"the next {stage} run: its process {pid} was gone")
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    return closed


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[Any]:
    """An MLflow run for one stage: child of the flow's run when there is one."""
    import mlflow

    from gaussian_atlas.config import flatten

    exp_id = setup_mlflow()
    close_orphans(exp_id, stage)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"gatlas.stage": stage, "mlflow.source.git.commit": git_commit(),
            "gatlas.invoked_by": "flow" if parent else "dvc", "gatlas.host": socket.gethostname(),
            "gatlas.pid": str(os.getpid())}
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent, tags=tags) as run:
        flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
        yield run


def gate_tag(tag: str, fraction: float, limit: float) -> bool:
    """Tag the active MLflow run with a gate's verdict; True when the gate passed."""
    import mlflow

    passed = fraction <= limit
    mlflow.set_tag(tag, "passed" if passed else "failed")
    return passed


def check_gate(stage: str, fraction: float, limit: float, key: str, what: str, reasons: Path) -> None:
    """Fail the stage in one line when more than ``limit`` of its inputs were ``what`` (quarantined/rejected)."""
    if fraction > limit:
        raise StageError(f"{stage}: {fraction:.1%} of the inputs were {what}, above {key}={limit:.1%}; "
                         f"reasons in {reasons}")


def main_guard(fn) -> None:
    """Run a stage's main; known failures print one line and exit 1."""
    from gaussian_atlas.data import DatasetError

    try:
        fn()
    except (StageError, DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except ValueError as exc:  # config problems (unknown params keys, bad values)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
