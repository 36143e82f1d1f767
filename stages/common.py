"""What every stage shim shares: the stage skeleton (:func:`run_stage`), params, telemetry off, MLflow runs,
one-line failures.

A stage file holds its flags and a body: the body reads its config from params, calls the library, writes
its outputs and returns a :class:`StageResult` (its metrics, artifacts and one-line summary); the skeleton
parses the command line, opens the MLflow run when the body asks (:meth:`StageRun.start`), writes the DVC
metrics file, logs metrics, tags and artifacts, prints the summary and applies the quality gate::

    FLAGS = [("--out", "data/fits", "fit output folder")]

    def body(run: StageRun) -> StageResult:
        cfg = run.config(FitConfig)                  # params.yaml: fit -> the frozen dataclass
        run.start(to_dict(cfg))                      # the MLflow run opens here, the clock starts
        table = fit(...)
        return StageResult({"n_ok": ...}, f"fit: ... -> {run.args.out}", artifacts=[...])

    main = stage_main("fit", body, doc=__doc__, flags=FLAGS)

MLflow is configured here, at the edge, never at import time of the library.
Tracking store: ``sqlite:///<repo>/mlflow/mlflow.db`` with artifacts under
``<repo>/mlflow/artifacts`` unless ``MLFLOW_TRACKING_URI`` says otherwise.

A stage started by the Prefect flow finds the flow's parent run id in
``GATLAS_MLFLOW_PARENT_RUN_ID`` and logs as its child; started alone
(``dvc repro ingest``) it opens a run of its own. Either way the run is tagged
with the stage name and the git commit.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARENT_ENV = "GATLAS_MLFLOW_PARENT_RUN_ID"


# The fit stage's fan-out starts a temporary Prefect server. With a fresh PREFECT_HOME it first
# creates its database: ~30 s on the 2-core CPU machine, over Prefect's default start timeout (20 s).
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def telemetry_off() -> None:
    """Telemetry off (and Prefect's temporary-server start timeout raised) unless the environment says otherwise."""
    from gaussian_atlas.config import telemetry_off as off

    off(PREFECT_DEFAULTS)


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


def default_tracking_uri() -> str:
    """The project's own store: ``sqlite:///<repo>/mlflow/mlflow.db``."""
    return f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


# what the experiments hold, for MLflow and its API (MLflow 3.17's UI does not go by it: see ui_url)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
UI = "http://127.0.0.1:5000"  # `make ui`


def ui_url(experiment_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs in its "Model training" mode: MLflow 3.17's UI takes the mode
    from the URL's ``workflowType`` (or the browser's last choice) and otherwise opens on its GenAI pages
    (an "Overview" of traces), whatever the experiment's tags say. On the tracking server when
    ``MLFLOW_TRACKING_URI`` names one, else on `make ui`'s."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI
    return f"{base}/#/experiments/{experiment_id or '<id>'}/runs?workflowType=machine_learning"


def setup_mlflow(experiment: str | None = None) -> str:
    """Point MLflow at the project store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri()
    # the project's store keeps its artifacts beside it, not in <cwd>/mlruns (MLflow's default); decided here, as
    # set_tracking_uri sets MLFLOW_TRACKING_URI, and by the URI, as stages inherit that variable from the flow
    artifacts = ROOT / "mlflow" / "artifacts" if uri == default_tracking_uri() else None
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = experiment or load_params().get("mlflow", {}).get("experiment", "gaussian-atlas")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = artifacts.as_uri() if artifacts is not None else None
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


PYFUNC_REQUIREMENTS = ("torch", "diffusers", "transformers", "numpy", "pandas", "plyfile")


def model_signature(sample: Any) -> Any:
    """The registered model's MLflow signature: the columns ``predict`` returns and a params schema
    (``out_dir``, ``steps``, ``guidance``, ``batch_size``, ``seed``) whose defaults are ``sample`` (a
    :class:`gaussian_atlas.sample.SampleConfig`). No input schema: MLflow would refuse a plain list of prompts
    before ``predict`` sees it; ``predict`` checks its input itself (``gaussian_atlas/atlas_pyfunc.py``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from gaussian_atlas.atlas_pyfunc import OUTPUT_COLUMNS, param_defaults

    dtype = {str: "string", int: "long", float: "double"}
    return ModelSignature(outputs=Schema([ColSpec(t, name) for name, t in OUTPUT_COLUMNS.items()]),
                          params=ParamSchema([ParamSpec(k, dtype[type(v)], v)
                                              for k, v in param_defaults(sample).items()]))


def register_model(model: Path, name: str, sample: Any) -> Any:
    """Log a model folder to the active run as an MLflow pyfunc (models-from-code:
    ``src/gaussian_atlas/atlas_pyfunc.py``, with the library as its code) with :func:`model_signature` of
    ``sample`` (the train stage: ``params.yaml: evaluate.sample``) and register it as ``name``; returns
    MLflow's ``ModelInfo``.

    No input example: MLflow validates one by running ``predict``, i.e. by sampling the model and writing PLYs.
    """
    import warnings

    import mlflow
    from importlib.metadata import version

    from gaussian_atlas.atlas_pyfunc import INPUT_DOC

    lib = ROOT / "src" / "gaussian_atlas"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(name="model", python_model=str(lib / "atlas_pyfunc.py"),
                                       artifacts={"model_dir": str(model)}, signature=model_signature(sample),
                                       metadata={"input": INPUT_DOC},
                                       pip_requirements=[f"{d}=={version(d)}" for d in PYFUNC_REQUIREMENTS],
                                       code_paths=[str(lib)], registered_model_name=name)
    print(f"train: registered {name!r} version {info.registered_model_version} ({info.model_uri})")
    return info


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


# ---------------------------------------------------------------------------------------------------------
# The workspace lock: at most one pipeline run per workspace, and no stage beside it

LOCK_FILE = Path(".dvc") / "tmp" / "gatlas.lock"
LOCK_ENV = "GATLAS_WORKSPACE_LOCK"  # the token of the pipeline run that holds the lock, for the stages it starts


class WorkspaceBusy(RuntimeError):
    """The workspace lock is held by another process; ``holder`` is what a pipeline run holding it wrote there
    (``what``, ``pid``, ``host``, ``started``, ``token``; empty when stages hold it)."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{describe_holder(holder)} holds {path}")


def lock_holder(path: str | os.PathLike) -> dict[str, Any]:
    """What the pipeline run that last took the lock at ``path`` exclusively wrote there ({} when none did)."""
    import json

    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "a stage (`dvc repro` or run by hand)"
    what = f"{holder.get('what', 'a pipeline run')} (pid {holder['pid']} on {holder.get('host', '?')}, " \
           f"started {holder.get('started', '?')})"
    if holder.get("host") == socket.gethostname() and not _alive(holder["pid"]):
        return f"a process left by {what[:-1]}, now gone)"  # e.g. its `dvc repro`, which inherits the lock
    return what


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike, what: str, *, shared: bool = False, wait: float = 1.0
                   ) -> Iterator[tuple[str, int]]:
    """Hold the workspace lock ``<root>/.dvc/tmp/gatlas.lock`` (``fcntl.flock``: the kernel releases it when the
    holder dies, even by ``kill -9``); yields ``(token, fd)``.

    A pipeline run takes it exclusively and writes ``what``, its pid, host, start time and a fresh ``token`` into
    the file; a stage takes it shared (stages may run side by side: DVC's own locks order them). Raises
    :class:`WorkspaceBusy` naming the holder when the lock is not free within ``wait`` seconds (exclusive only;
    a shared request never waits).
    """
    import fcntl
    import json
    import uuid

    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + (0.0 if shared else wait)
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(path, lock_holder(path)) from None
                time.sleep(0.05)
        token = uuid.uuid4().hex
        if shared:
            if os.fstat(fd).st_size:  # the text of an exclusive holder that is gone: no one holds it exclusively now
                os.ftruncate(fd, 0)
        else:
            info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": token}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield token, fd
        finally:
            if not shared:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def hold_workspace(stage: str, stack: contextlib.ExitStack) -> None:
    """Hold the workspace lock shared while ``stage`` runs in a DVC workspace (the working directory holds
    ``.dvc``: where ``dvc repro`` runs a stage). A stage refuses to run beside a pipeline run, except a
    stage that pipeline run started itself (its token in ``GATLAS_WORKSPACE_LOCK``). Ranks other than 0 of a
    DDP launch run under their rank 0."""
    root = Path.cwd()
    if not (root / ".dvc").is_dir() or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        stack.enter_context(workspace_lock(root, f"stage {stage}", shared=True))
    except WorkspaceBusy as busy:
        token = os.environ.get(LOCK_ENV)
        if token and busy.holder.get("token") == token:
            return  # started by the pipeline run that holds the lock
        raise StageError(f"{stage}: {busy}; a stage does not run beside a pipeline run in the same workspace: "
                         f"wait for it to finish (or stop it), then rerun") from None


# ---------------------------------------------------------------------------------------------------------
# The stage skeleton

Artifact = Union[str, os.PathLike, tuple[Union[str, os.PathLike], str]]
"""A file or folder to log to MLflow, optionally with its artifact path: ``path`` or ``(path, artifact_path)``."""


@dataclass(frozen=True)
class Gate:
    """A quality gate: the share ``fraction`` of a stage's inputs that were ``what`` (quarantined, rejected)
    against ``limit`` (the params key ``key``). The run is tagged ``tag`` = passed | failed; a failed gate fails
    the stage in one line, after its outputs are written and its summary printed, naming ``reasons``."""

    tag: str
    fraction: float
    limit: float
    key: str
    what: str
    reasons: Path

    @property
    def passed(self) -> bool:
        return self.fraction <= self.limit

    def failure(self, stage: str) -> str:
        return (f"{stage}: {self.fraction:.1%} of the inputs were {self.what}, above {self.key}={self.limit:.1%}; "
                f"reasons in {self.reasons}")


@dataclass
class StageResult:
    """What a stage body returns; :func:`run_stage` writes, logs and prints it.

    ``metrics`` is written to the DVC metrics file (``--metrics``), followed by ``expectations`` (a
    great-expectations suite's failed-row count per expectation) as ``failed_expectations`` when given;
    MLflow gets ``mlflow_metrics``, by default the numbers among the top-level entries of ``metrics``
    (None and NaN left out).
    ``failure`` (or a failed ``gate``) fails the stage in one line once everything is written and printed.
    """

    metrics: dict[str, Any]
    summary: str
    artifacts: Sequence[Artifact] = ()
    mlflow_metrics: dict[str, float] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    expectations: dict[str, int] | None = None
    gate: Gate | None = None
    failure: str | None = None


def top_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of ``metrics`` (booleans as 0/1) as MLflow metrics; None, NaN and the rest left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}


def nested_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as flat MLflow metric names (``generated.colour_accuracy``); a
    ``*_ci95`` pair becomes ``*_ci95_low`` / ``*_ci95_high``."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(nested_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
        elif isinstance(v, list) and len(v) == 2 and key.endswith("_ci95") and None not in v:
            out[key + "_low"], out[key + "_high"] = float(v[0]), float(v[1])
    return out


class StageRun:
    """What a stage body gets: its parsed flags (``args``), its params, and the MLflow run it opens with
    :meth:`start` once its config is known (a config error fails before any run exists)."""

    def __init__(self, name: str, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.name, self.args, self._stack = name, args, stack
        self._t0: float | None = None

    def params(self, section: str | None = None) -> dict[str, Any]:
        """``params.yaml`` (``--params``): the whole file, or one section (a StageError when it is missing)."""
        return load_params(section, self.args.params)

    def config(self, cls: type, section: str | None = None) -> Any:
        """The frozen dataclass ``cls`` from ``params.yaml: <section>`` (default: the stage's), every key given."""
        from gaussian_atlas.config import from_dict

        section = section or self.name
        return from_dict(cls, self.params(section), f"params.yaml: {section}", complete=True)

    def start(self, run_params: dict[str, Any]) -> None:
        """Open the stage's MLflow run (:func:`stage_run`: a child of the flow's run when there is one) with
        ``run_params`` logged as its params, and start the clock of :meth:`elapsed`."""
        self._stack.enter_context(stage_run(self.name, run_params))
        self._t0 = time.perf_counter()

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        assert self._t0 is not None, "elapsed() before start()"
        return time.perf_counter() - self._t0

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of one training step (the library's ``log`` callback)."""
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def log_image(self, step: int, image: Any) -> None:
        """A preview sheet of ``step`` as ``samples/step_<step>.png`` (the library's ``images`` callback)."""
        import mlflow

        mlflow.log_image(image, f"samples/step_{step:06d}.png")


Flag = tuple  # (flag, default, help) or (flag, default, help, {more argparse keywords})


def stage_parser(name: str, doc: str | None, flags: Sequence[Flag]) -> argparse.ArgumentParser:
    """A stage's command line: its own ``flags``, then ``--metrics`` (``metrics/<name>.json``) and ``--params``."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, text, *more in (*flags, ("--metrics", f"metrics/{name}.json", "DVC metrics file")):
        if default is not None:
            text += " (default: %(default)s)"
        ap.add_argument(flag, default=default, help=text, **(more[0] if more else {}))
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    return ap


def stage_main(name: str, body: Callable[[StageRun], StageResult | None], *, doc: str | None = None,
               flags: Sequence[Flag] = ()) -> Callable[..., StageResult | None]:
    """A stage's ``main(argv=None)``: :func:`run_stage` of ``body`` (errors raise; ``main_guard(main)`` prints
    them in one line when the stage runs as a program)."""
    return functools.partial(run_stage, name, body, doc=doc, flags=flags)


def _log_artifact(item: Artifact) -> None:
    import mlflow

    path, artifact_path = item if isinstance(item, tuple) else (item, None)
    if Path(path).is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def run_stage(name: str, body: Callable[[StageRun], StageResult | None], argv: list[str] | None = None, *,
              doc: str | None = None, flags: Sequence[Flag] = ()) -> StageResult | None:
    """The skeleton of every stage: parse ``flags``, run ``body``, then write ``result.metrics`` to ``--metrics``
    (atomically), log metrics, tags and artifacts to the run the body opened (none when it opened none), close
    the run, print the summary and fail in one line (:class:`StageError`) on a failed gate or ``failure``.

    An exception from the body marks the MLflow run FAILED; :func:`main_guard` prints it in one line.
    ``body`` returns None when there is nothing to write (e.g. a DDP rank other than 0).
    """
    from gaussian_atlas import io as gio

    args = stage_parser(name, doc, flags).parse_args(argv)
    with contextlib.ExitStack() as stack:
        hold_workspace(name, stack)
        run = StageRun(name, args, stack)
        result = body(run)
        if result is None:
            return None
        failed = {} if result.expectations is None else {"failed_expectations": result.expectations}
        gio.write_json(args.metrics, {**result.metrics, **failed})
        if run.started:
            import mlflow

            mlflow.log_metrics(top_numbers(result.metrics) if result.mlflow_metrics is None else result.mlflow_metrics)
            tags = dict(result.tags)
            if result.gate is not None:
                tags[result.gate.tag] = "passed" if result.gate.passed else "failed"
            if tags:
                mlflow.set_tags(tags)
            for item in result.artifacts:
                _log_artifact(item)
    print(result.summary)
    if result.gate is not None and not result.gate.passed:
        raise StageError(result.gate.failure(name))
    if result.failure:
        raise StageError(result.failure)
    return result
