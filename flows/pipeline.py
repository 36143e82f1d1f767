"""The Gaussian Atlas pipeline as a Prefect flow over the DVC stages.

    python -m flows.pipeline run                 # every stage in dvc.yaml order, once
    python -m flows.pipeline run --stages ingest # only some stages
    python -m flows.pipeline run --force         # re-run even when DVC says up to date
    python -m flows.pipeline serve --cron "0 3 * * *"   # scheduled retrain (needs a Prefect server: `make serve`)

Each stage is a Prefect task that runs ``dvc repro --single-item <stage>`` in a
subprocess, streams its output into the Prefect run log, retries on failure
(``flow.retries`` in params.yaml) and fails the flow on a non-zero exit. The
flow opens one MLflow parent run; every stage logs a child run under it
(the parent's id travels in ``GATLAS_MLFLOW_PARENT_RUN_ID``). DVC decides what is
up to date, so a second run only re-executes stages whose deps or params changed.

One pipeline run per workspace at a time: a run holds the workspace lock
``.dvc/tmp/gatlas.lock`` (``stages.common.workspace_lock``) for its whole length. A run
that finds it held, or finds DVC busy in the workspace (a ``dvc repro`` by hand), does not
wait: it skips (its slot), says who holds what, and returns ``{"skipped": <why>}``. Of
several missed schedule slots (``serve`` was down) only the latest runs; the earlier
ones skip as superseded (:func:`later_slot`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from stages.common import (LOCK_ENV, PARENT_ENV, ROOT, WorkspaceBusy, _alive, git_commit, load_params, setup_mlflow,
                           telemetry_off, ui_url, workspace_lock)

telemetry_off()

from prefect import flow, get_run_logger, task  # noqa: E402


def dvc_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """Stage names in the order dvc.yaml lists them (the pipeline order)."""
    with open(dvc_yaml, encoding="utf-8") as fh:
        return list((yaml.safe_load(fh) or {}).get("stages", {}))


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else (shutil.which("dvc") or "dvc")


def _retries() -> int:
    return int(load_params().get("flow", {}).get("retries", 1))


@task(name="dvc-stage", task_run_name="{stage}", retries=_retries(), retry_delay_seconds=5)
def run_stage(stage: str, parent_run_id: str, force: bool = False, root: str | None = None,
              lock_token: str | None = None, lock_fd: int | None = None) -> str:
    """``dvc repro --single-item <stage>``; returns "ran", "up to date" or, when the stage printed that it skipped its
    work (``<stage>: skipped (<reason>)``, e.g. pretrain2d with ``pretrain2d.enabled: false``), "skipped (<reason>)".

    ``lock_token``/``lock_fd``: the workspace lock this pipeline run holds. The stage gets the token (so it runs
    although the lock is held) and ``dvc`` inherits the descriptor (so the lock stays held while a ``dvc repro``
    this run started is alive, even if the run itself is killed).
    """
    logger = get_run_logger()
    cmd = [_dvc(), "repro", "--single-item", stage] + (["--force"] if force else [])
    env = {**os.environ, PARENT_ENV: parent_run_id, "PYTHONUNBUFFERED": "1"}
    if lock_token:
        env[LOCK_ENV] = lock_token
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    # its own session: a cancelled or interrupted run stops dvc and the stage's command with it (`_stop`)
    proc = subprocess.Popen(cmd, cwd=root or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, pass_fds=() if lock_fd is None else (lock_fd,), start_new_session=True)
    tail: list[str] = []
    skipped = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if "\r" in line:  # progress bars: keep the last state of the line
                line = line.rsplit("\r", 1)[-1]
            if line.strip():
                logger.info(line)
                tail = (tail + [line])[-20:]
                skipped = skip_reason(stage, line) or skipped
        rc = proc.wait()
    except BaseException:  # Ctrl-C, or `serve` cancelling the run (SIGTERM): no orphaned `dvc repro` keeps going
        _stop(proc)
        raise
    if rc != 0:
        raise RuntimeError(f"stage {stage!r} failed (exit {rc}):\n" + "\n".join(tail[-8:]))
    if any("didn't change, skipping" in t for t in tail):
        return "up to date"
    return f"skipped ({skipped})" if skipped else "ran"


def skip_reason(stage: str, line: str) -> str | None:
    """The reason in a stage's summary line ``<stage>: skipped (<reason>)``; None for any other line."""
    m = re.fullmatch(rf"{re.escape(stage)}: skipped \((.*)\)", line.strip())
    return m.group(1) if m else None


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (dvc and the stage it runs), SIGKILL after ``grace`` seconds."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass


def dvc_busy(root: str | os.PathLike, wait: float = 5.0) -> str | None:
    """What DVC process is working in the DVC project ``root``, or None when DVC is idle there.

    Busy: DVC's repo lock ``.dvc/tmp/lock`` is held (``dvc repro`` holds it except while a stage's command runs),
    or ``.dvc/tmp/rwlock`` lists a live process (a stage DVC is running: its deps and outs). Waits up to ``wait``
    seconds for a short command (``dvc status``) to end before calling DVC busy.
    """
    deadline = time.monotonic() + wait
    while True:
        busy = _dvc_busy_now(Path(root) / ".dvc" / "tmp")
        if busy is None or time.monotonic() >= deadline:
            return busy
        time.sleep(0.25)


def _dvc_busy_now(tmp: Path) -> str | None:
    lock = tmp / "lock"
    if lock.exists():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # DVC (zc.lockfile) holds it with LOCK_EX
        except BlockingIOError:
            pid = lock.read_text(errors="replace").strip()
            return f"a DVC command{f' (pid {pid})' if pid.isdigit() else ''} holds {lock}"
        finally:
            os.close(fd)  # releases the probe
    try:
        rw = json.loads((tmp / "rwlock").read_text())
    except (OSError, ValueError):
        return None
    infos = [*rw.get("write", {}).values(), *(i for v in rw.get("read", {}).values() for i in v)]
    for info in infos:
        if isinstance(info, dict) and isinstance(info.get("pid"), int) and info["pid"] != os.getpid() \
                and _alive(info["pid"]):
            return f"DVC (pid {info['pid']}: {info.get('cmd', '?')}) is running a stage ({tmp / 'rwlock'})"
    return None


def later_slot(client: Any, deployment_id: Any, flow_run_id: Any, slot: Any, now: Any = None) -> Any:
    """The latest other run of the deployment whose slot (expected start) lies after ``slot`` and is already due
    (not after ``now``), cancelled runs left out; None when there is none. A run that starts and finds one is a
    missed slot superseded by a later one (the runner started every missed slot at once)."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterExpectedStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.types._datetime import now as prefect_now

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        expected_start_time=FlowRunFilterExpectedStartTime(after_=slot, before_=now or prefect_now("UTC")),
        state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.CANCELLED, StateType.CANCELLING]))),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
    later = [r for r in runs if str(r.id) != str(flow_run_id) and r.expected_start_time > slot]
    return later[0] if later else None


def _superseded() -> str | None:
    """Why this run is a missed schedule slot that a later due slot supersedes (None when it is not)."""
    from prefect import runtime
    from prefect.client.orchestration import get_client

    deployment_id = runtime.deployment.id
    if not deployment_id:  # `python -m flows.pipeline run`: no schedule
        return None
    slot = runtime.flow_run.scheduled_start_time
    with get_client(sync_client=True) as client:
        later = later_slot(client, deployment_id, runtime.flow_run.id, slot)
    if later is None:
        return None
    return (f"slot {slot:%Y-%m-%d %H:%M} was missed and the later slot {later.expected_start_time:%Y-%m-%d %H:%M} "
            f"(flow run {later.name}) supersedes it")


def _skip(reason: str) -> dict[str, Any]:
    get_run_logger().warning("%s: skipping this slot", reason)
    return {"mlflow_run_id": None, "stages": {}, "skipped": reason}


@flow(name="gaussian-atlas-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False, root: str | None = None) -> dict[str, Any]:
    """Run the DVC stages in order under one MLflow parent run, holding the workspace lock.

    ``root``: the DVC project to run (default: this repository). Returns ``{"skipped": <why>}`` without running
    anything when another pipeline run holds the workspace lock, DVC is busy in the workspace, or a later
    missed schedule slot supersedes this one.
    """
    import mlflow
    from prefect import runtime

    root_path = Path(root or ROOT)
    all_stages = dvc_stages(root_path / "dvc.yaml")
    stages = stages or all_stages
    unknown = [s for s in stages if s not in all_stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {all_stages}")
    superseded = _superseded()
    if superseded:
        return _skip(superseded)
    with contextlib.ExitStack() as stack:
        try:
            token, fd = stack.enter_context(workspace_lock(root_path, f"pipeline run {runtime.flow_run.name!r}"))
        except WorkspaceBusy as busy:
            return _skip(f"another pipeline run holds the workspace lock: {busy}")
        dvc = dvc_busy(root_path)
        if dvc:
            return _skip(dvc)
        exp_id = setup_mlflow()
        t0 = time.perf_counter()
        status: dict[str, str] = {}
        with mlflow.start_run(experiment_id=exp_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M')}",
                              tags={"gatlas.stage": "pipeline", "mlflow.source.git.commit": git_commit(),
                                    "gatlas.stages": ",".join(stages)}) as parent:
            for stage in stages:
                status[stage] = run_stage(stage, parent.info.run_id, force, root, token, fd)
                mlflow.set_tag(f"gatlas.stage.{stage}", status[stage])
            mlflow.log_metric("pipeline_seconds", time.perf_counter() - t0)
            run_id = parent.info.run_id
    logger = get_run_logger()
    logger.info("MLflow parent run %s (%s)", run_id, mlflow.get_tracking_uri())
    return {"mlflow_run_id": run_id, "mlflow_experiment_id": exp_id, "stages": status}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline once (Prefect's temporary server if none is configured)")
    r.add_argument("--stages", nargs="+", help="stages to run (default: all, in dvc.yaml order)")
    r.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")
    s = sub.add_parser("serve", help="serve the flow on a cron schedule (needs a Prefect server: `make serve` starts "
                                     "one and this, with the right environment)")
    s.add_argument("--cron", default=load_params().get("flow", {}).get("cron", "0 3 * * *"),
                   help="cron schedule (default: params.yaml flow.cron = %(default)s)")
    s.add_argument("--name", default="scheduled-retrain", help="deployment name (default: %(default)s)")
    s.add_argument("--force", action="store_true", help="force every stage on each scheduled run")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        from stages.fanout import unreachable_api, without_api

        problem = unreachable_api()
        if problem:  # e.g. PREFECT_API_URL left in the profile by `prefect config set`, its server gone
            print(f"note: {problem}; running on a temporary local Prefect server instead", file=sys.stderr)
        try:
            with without_api() if problem else contextlib.nullcontext():
                result = pipeline(stages=args.stages, force=args.force)
        except Exception as exc:
            print(f"error: pipeline failed: {exc}", file=sys.stderr)
            sys.exit(1)
        if result.get("skipped"):
            print(f"error: pipeline not run: {result['skipped']}", file=sys.stderr)
            sys.exit(1)
        print("pipeline finished:", ", ".join(f"{k}: {v}" for k, v in result["stages"].items()))
        print(f"MLflow: parent run {result['mlflow_run_id']}; start the UI with `make ui` (or\n"
              f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1 --port 5000)\n"
              f"  and open {ui_url(result['mlflow_experiment_id'])}")
    else:
        from prefect.settings import PREFECT_API_URL

        from stages.fanout import unreachable_api

        problem = "PREFECT_API_URL is not set" if not PREFECT_API_URL.value() else unreachable_api()
        if problem:  # fail now rather than poll a dead server for a minute and crash
            print(f"error: serve needs a running Prefect server ({problem}); `make serve` starts one and the "
                  f"schedule together (docs/operations.md)", file=sys.stderr)
            sys.exit(1)
        pipeline.serve(name=args.name, cron=args.cron, parameters={"force": args.force})


if __name__ == "__main__":
    main()
