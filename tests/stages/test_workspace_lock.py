"""Retrains that cannot collide: one pipeline run per workspace at a time (the workspace lock), a stage does not
run beside a pipeline run, a lock dies with its holder, DVC busy is seen, missed schedule slots collapse to the
latest, and a dead PREFECT_API_URL neither breaks the fit stage's fan-out nor hangs `serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "PYTHONUNBUFFERED": "1"}
DEAD_API = "http://127.0.0.1:9/api"  # the discard port: nothing answers there

# A one-stage DVC project whose stage says it started, then waits until the test releases it.
STAGE = textwrap.dedent("""
    import time
    from pathlib import Path
    Path("started").touch()
    t0 = time.time()
    while not Path("release").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    with open("runs.log", "a") as fh:
        fh.write("ran\\n")
    Path("done.txt").write_text("done")
""")


def _wait_for(cond, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


@pytest.fixture
def tiny_dvc(tmp_path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "stage.py").write_text(STAGE)
    (proj / "dvc.yaml").write_text(json.dumps({"stages": {"wait": {
        "cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "outs": ["done.txt"]}}}))
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=proj, check=True,
                   env=ENV)
    return proj


@pytest.mark.slow
def test_two_runs_at_once_one_runs_the_other_skips(tiny_dvc, tmp_path, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(pipeline(root=str(tiny_dvc))))
    t.start()
    try:
        _wait_for(lambda: (tiny_dvc / "started").exists() or not t.is_alive())
        assert t.is_alive(), first
        second = pipeline(root=str(tiny_dvc))  # fired while the first one's stage runs
    finally:
        (tiny_dvc / "release").touch()
        t.join(180)
    assert first["stages"] == {"wait": "ran"} and first["mlflow_run_id"]
    assert second["stages"] == {} and second["mlflow_run_id"] is None
    why = second["skipped"]
    assert "another pipeline run holds the workspace lock" in why and str(tiny_dvc / ".dvc/tmp/gatlas.lock") in why
    assert f"pid {os.getpid()}" in why  # the first run (a thread of this process) is named as the holder
    assert (tiny_dvc / "runs.log").read_text() == "ran\n"  # the stage ran exactly once
    assert (tiny_dvc / ".dvc/tmp/gatlas.lock").read_text() == ""  # released, holder text cleared

    # a `dvc repro` by hand holding DVC's repo lock: the pipeline run skips too, and the lock is free after it
    import zc.lockfile

    dvc_lock = zc.lockfile.LockFile(str(tiny_dvc / ".dvc/tmp/lock"))
    try:
        busy = pipeline(root=str(tiny_dvc))
    finally:
        dvc_lock.close()
    assert "a DVC command" in busy["skipped"] and busy["stages"] == {}
    assert pipeline(root=str(tiny_dvc), force=True)["stages"] == {"wait": "ran"}
    assert (tiny_dvc / "runs.log").read_text() == "ran\nran\n"


HOLD = textwrap.dedent("""
    import sys, time
    from stages.common import workspace_lock
    with workspace_lock(sys.argv[1], "pipeline run 'doomed'"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_the_lock_of_a_run_killed_with_9_does_not_block_the_next(tmp_path):
    from stages.common import WorkspaceBusy, workspace_lock

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy) as busy:
            with workspace_lock(tmp_path, "pipeline run 'next'", wait=0.2):
                pass
        assert f"pipeline run 'doomed' (pid {proc.pid} on" in str(busy.value)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup; the kernel drops the flock
        proc.wait()
    assert proc.returncode == -9
    with workspace_lock(tmp_path, "pipeline run 'next'", wait=0.2) as (token, _):
        holder = json.loads((tmp_path / ".dvc/tmp/gatlas.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["token"] == token and holder["what"] == "pipeline run 'next'"


def test_a_stage_does_not_run_beside_a_pipeline_run_except_its_own(tmp_path, monkeypatch):
    from stages.common import LOCK_ENV, StageError, StageResult, WorkspaceBusy, run_stage, workspace_lock

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LOCK_ENV, raising=False)
    ran = []

    def body(run):
        ran.append(run.name)
        with pytest.raises(WorkspaceBusy):  # a stage holds the lock (shared) while it runs: no pipeline run starts
            with workspace_lock(tmp_path, "pipeline run 'late'", wait=0.1):
                pass
        return StageResult({"n": 1}, "demo: done")

    with workspace_lock(tmp_path, "pipeline run 'nightly'") as (token, _):
        with pytest.raises(StageError, match=r"demo: pipeline run 'nightly' \(pid \d+ .*\) holds .*gatlas.lock; "
                                             r"a stage does not run beside a pipeline run"):
            run_stage("demo", body, ["--metrics", "m.json"])
        assert ran == [] and not (tmp_path / "m.json").exists()
        monkeypatch.setenv(LOCK_ENV, token)  # started by that pipeline run: runs
        run_stage("demo", lambda run: StageResult({"n": 1}, "demo: done"), ["--metrics", "m.json"])
        assert (tmp_path / "m.json").exists()
    monkeypatch.delenv(LOCK_ENV)
    run_stage("demo", body, ["--metrics", "m2.json"])  # no pipeline run: the stage runs (and holds the lock)
    assert ran == ["demo"]


def test_dvc_busy_sees_the_repo_lock_and_running_stages(tmp_path):
    import zc.lockfile

    from flows.pipeline import dvc_busy

    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    assert dvc_busy(tmp_path, wait=0) is None
    lock = zc.lockfile.LockFile(str(tmp / "lock"))
    try:
        assert f"a DVC command (pid {os.getpid()}) holds" in dvc_busy(tmp_path, wait=0)
    finally:
        lock.close()
    assert dvc_busy(tmp_path, wait=0) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp / "rwlock").write_text(json.dumps({"write": {"data/fits": {"pid": sleeper.pid, "cmd": "dvc repro fit"}},
                                                "read": {}}))
        assert f"DVC (pid {sleeper.pid}: dvc repro fit) is running a stage" in dvc_busy(tmp_path, wait=0)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert dvc_busy(tmp_path, wait=0) is None  # an entry of a dead process (DVC cleans those itself)


@pytest.mark.slow
def test_of_missed_slots_only_the_latest_runs(prefect_harness):
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Completed, Scheduled
    from prefect.types._datetime import now

    from flows.pipeline import later_slot

    t = now("UTC").replace(microsecond=0)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("missed-slots-test")
        dep = client.create_deployment(flow_id=flow_id, name="nightly")
        other = client.create_deployment(flow_id=flow_id, name="other")

        def slot(minutes_ago: int, state=None, deployment=dep):
            return client.create_flow_run_from_deployment(
                deployment, state=state or Scheduled(scheduled_time=t - timedelta(minutes=minutes_ago)))

        def later(run):
            return later_slot(client, dep, run.id, run.expected_start_time)

        r1, r2, r3 = slot(180), slot(120), slot(60)  # three slots missed while `serve` was down
        slot(-60)  # the next slot, not due yet
        slot(30, deployment=other)  # another deployment's slot
        assert later(r1).id == r3.id and later(r2).id == r3.id  # superseded by the latest due slot
        assert later(r3) is None  # the latest missed slot runs
        client.set_flow_run_state(r3.id, Completed(), force=True)
        assert later(r1).id == r3.id  # a later slot already served supersedes too
        client.set_flow_run_state(r3.id, Cancelled(), force=True)
        assert later(r1).id == r2.id and later(r2) is None  # a cancelled run serves no slot


FAN_OUT = textwrap.dedent("""
    from stages.fanout import fan_out
    def square(x):
        return [{"x": x, "y": x * x}]
    rows = fan_out(square, [(f"c{i}", (i,), {}) for i in range(3)], runner="threads", workers=2)
    print("rows", sorted(r["y"] for r in rows))
""")


@pytest.mark.slow
def test_fan_out_runs_when_prefect_api_url_points_at_a_dead_server(tmp_path):
    env = {**ENV, "PREFECT_API_URL": DEAD_API, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([sys.executable, "-c", FAN_OUT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows [0, 1, 4]" in proc.stdout
    assert f"note: PREFECT_API_URL={DEAD_API} does not answer" in proc.stdout


def test_serve_without_a_live_server_fails_at_once(tmp_path):
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect")}
    for url, why in ((DEAD_API, f"PREFECT_API_URL={DEAD_API} does not answer"), (None, "PREFECT_API_URL is not set")):
        env.pop("PREFECT_API_URL", None)
        if url:
            env["PREFECT_API_URL"] = url
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "serve", "--cron", "* * * * *"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and time.time() - t0 < 60
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: serve needs a running Prefect server ({why}")
