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

A configured Prefect API (``PREFECT_API_URL``, from the environment or the active
profile) is used when it answers, so a stage run by a served pipeline shows its fan-out
on that server. When it does not answer (a server that was stopped, an URL left in the
profile by ``prefect config set``), the fan-out says so and runs on a temporary local
server instead of failing with ``Failed to reach API``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

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


def unreachable_api(timeout: float = 3.0) -> str | None:
    """Why the configured Prefect API cannot be reached; None when it answers or none is configured (then
    Prefect starts a temporary local server)."""
    import urllib.error
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered (e.g. a server that wants a key): reachable
        return None
    except (OSError, ValueError) as exc:
        return f"PREFECT_API_URL={url} does not answer ({getattr(exc, 'reason', None) or exc})"
    return None


@contextlib.contextmanager
def without_api() -> Iterator[None]:
    """Prefect settings without an API URL: flows run on a temporary local server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


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

    problem = unreachable_api()
    if problem:
        print(f"note: {problem}; the fan-out runs on a temporary local Prefect server instead "
              f"(start that server, or unset PREFECT_API_URL: `prefect config unset PREFECT_API_URL`)")
    with without_api() if problem else contextlib.nullcontext():
        return _fan_out()
