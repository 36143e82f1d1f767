"""Fan-out of per-object work to a Prefect task runner (threads, or a Dask cluster): the fit stage's.

Objects are handed out in coarse chunks (``chunk_size`` objects per task), never
one task per object: Prefect's API and Dask's scheduler both slow down with
hundreds of thousands of tiny tasks. Each task writes its objects' outputs
itself (atomically) and returns small result rows; the calling stage merges
the rows and is the only MLflow writer.

Runners (``params.yaml: fit.runner``):

- ``threads`` (default): ``ThreadPoolTaskRunner(max_workers=fit.workers)``; on one
  GPU keep ``workers: 1`` (objects are already batched on the GPU).
- ``dask``: ``prefect_dask.DaskTaskRunner``; with ``fit.dask_address`` it connects
  to a running cluster (``dask scheduler`` + one ``dask worker --nthreads 1`` per
  GPU, each started with its own ``CUDA_VISIBLE_DEVICES``), otherwise it starts a
  local cluster of ``fit.workers`` worker processes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from stages.common import telemetry_off

telemetry_off()

from prefect import flow, task  # noqa: E402


def make_task_runner(runner: str, workers: int, address: str | None = None) -> Any:
    """The Prefect task runner for ``runner`` ("threads" or "dask")."""
    if runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, workers), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise ValueError(f"unknown runner {runner!r}; use 'threads' or 'dask'")


@task(name="chunk", task_run_name="{name}", retries=1, retry_delay_seconds=5)
def run_chunk(fn: Callable[..., list[dict[str, Any]]], name: str, args: tuple, kwargs: dict) -> list[dict[str, Any]]:
    """One coarse unit of work: ``fn(*args, **kwargs)`` returning result rows."""
    return fn(*args, **kwargs)


def fan_out(fn: Callable[..., list[dict[str, Any]]], chunks: Sequence[tuple[str, tuple, dict]], runner: str = "threads",
            workers: int = 1, address: str | None = None, flow_name: str = "fan-out") -> list[dict[str, Any]]:
    """Run ``fn`` over ``chunks`` (``(name, args, kwargs)`` each) on a task runner; returns all rows.

    ``fn`` must be importable by name (a module-level function) when the runner is Dask.
    """

    @flow(name=flow_name, task_runner=make_task_runner(runner, workers, address), log_prints=True)
    def _fan_out() -> list[dict[str, Any]]:
        futures = [run_chunk.submit(fn, name, args, kwargs) for name, args, kwargs in chunks]
        rows: list[dict[str, Any]] = []
        for f in futures:
            rows.extend(f.result())
        return rows

    return _fan_out()
