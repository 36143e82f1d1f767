"""The Gaussian Atlas pipeline as a Prefect flow over the DVC stages.

    python -m flows.pipeline run                 # every stage in dvc.yaml order, once
    python -m flows.pipeline run --stages ingest # only some stages
    python -m flows.pipeline run --force         # re-run even when DVC says up to date
    python -m flows.pipeline serve --cron "0 3 * * *"   # scheduled retrain (needs `prefect server start`)

Each stage is a Prefect task that runs ``dvc repro --single-item <stage>`` in a
subprocess, streams its output into the Prefect run log, retries on failure
(``flow.retries`` in params.yaml) and fails the flow on a non-zero exit. The
flow opens one MLflow parent run; every stage logs a child run under it
(the parent's id travels in ``GATLAS_MLFLOW_PARENT_RUN_ID``). DVC decides what is
up to date, so a second run only re-executes stages whose deps or params changed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from stages.common import PARENT_ENV, ROOT, git_commit, load_params, setup_mlflow, telemetry_off

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
def run_stage(stage: str, parent_run_id: str, force: bool = False, root: str | None = None) -> str:
    """``dvc repro --single-item <stage>``; returns "ran" or "up to date"."""
    logger = get_run_logger()
    cmd = [_dvc(), "repro", "--single-item", stage] + (["--force"] if force else [])
    env = {**os.environ, PARENT_ENV: parent_run_id, "PYTHONUNBUFFERED": "1"}
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=root or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if "\r" in line:  # progress bars: keep the last state of the line
            line = line.rsplit("\r", 1)[-1]
        if line.strip():
            logger.info(line)
            tail = (tail + [line])[-20:]
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"stage {stage!r} failed (exit {rc}):\n" + "\n".join(tail[-8:]))
    return "up to date" if any("didn't change, skipping" in t for t in tail) else "ran"


@flow(name="gaussian-atlas-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False, root: str | None = None) -> dict[str, Any]:
    """Run the DVC stages in order under one MLflow parent run.

    ``root``: the DVC project to run (default: this repository).
    """
    import mlflow

    all_stages = dvc_stages(Path(root or ROOT) / "dvc.yaml")
    stages = stages or all_stages
    unknown = [s for s in stages if s not in all_stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {all_stages}")
    exp_id = setup_mlflow()
    t0 = time.perf_counter()
    status: dict[str, str] = {}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M')}",
                          tags={"gatlas.stage": "pipeline", "mlflow.source.git.commit": git_commit(),
                                "gatlas.stages": ",".join(stages)}) as parent:
        for stage in stages:
            status[stage] = run_stage(stage, parent.info.run_id, force, root)
            mlflow.set_tag(f"gatlas.stage.{stage}", status[stage])
        mlflow.log_metric("pipeline_seconds", time.perf_counter() - t0)
        run_id = parent.info.run_id
    logger = get_run_logger()
    logger.info("MLflow parent run %s (%s)", run_id, mlflow.get_tracking_uri())
    return {"mlflow_run_id": run_id, "stages": status}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline once (Prefect's temporary server if none is configured)")
    r.add_argument("--stages", nargs="+", help="stages to run (default: all, in dvc.yaml order)")
    r.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")
    s = sub.add_parser("serve", help="serve the flow on a cron schedule (needs `prefect server start`)")
    s.add_argument("--cron", default=load_params().get("flow", {}).get("cron", "0 3 * * *"),
                   help="cron schedule (default: params.yaml flow.cron = %(default)s)")
    s.add_argument("--name", default="scheduled-retrain", help="deployment name (default: %(default)s)")
    s.add_argument("--force", action="store_true", help="force every stage on each scheduled run")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        try:
            result = pipeline(stages=args.stages, force=args.force)
        except Exception as exc:
            print(f"error: pipeline failed: {exc}", file=sys.stderr)
            sys.exit(1)
        print("pipeline finished:", ", ".join(f"{k}: {v}" for k, v in result["stages"].items()))
        print(f"MLflow: parent run {result['mlflow_run_id']}; open the UI with\n"
              f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1 --port 5000")
    else:
        pipeline.serve(name=args.name, cron=args.cron, parameters={"force": args.force})


if __name__ == "__main__":
    main()
