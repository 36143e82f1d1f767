"""End-to-end data throughput (issue #19 part 3): generate -> fit -> prune_check -> atlas -> normalize on one GPU,
the stages overlapped, for >= 1,000 procedural objects.

    python benchmarks/bench_data_e2e.py --out /tmp/w/e2e --objects 1000 --batch 128 --json /tmp/w/e2e.json
    python benchmarks/bench_data_e2e.py --device cpu --objects 6 --batch 3 --resolution 32 --views 8 --steps 20 \\
        --side 16 --out /tmp/e2e-smoke --json /tmp/e2e-smoke.json          # the CPU smoke test (plumbing only)

The library calls of the stages (as ``benchmarks/gpu_run.py`` makes them, without DVC, MLflow or Prefect, which a bare
GPU machine does not have):

- **generate**: ``gaussian_atlas.procedural`` objects (``object_specs``; each rendered by the generator's own
  per-object writer into ``<out>/procedural/objects/<id>/``), ``--resolution`` px, ``--views`` views;
- **fit**: ``gaussian_atlas.fit.fit_objects`` on packed batches of ``--batch`` objects; every object's PLY + metrics
  JSON in the fit stage's layout (``fit_outputs``: ``<out>/fits/objects/<shard>/<id>.{ply,json}``), written
  atomically with the library's writers (``write_ply``, ``io.write_json``), reuse keys ``config_hash`` /
  ``input_stamp`` as ``fit_chunk`` records them;
- **prune_check**: the stage's rules, ``gaussian_atlas.checks.prune_checks(PruneCheckConfig)``, run by
  great-expectations (``validate_fits``) when it is installed, else by a plain pandas reading of the same
  expectations (``--gate``; the GPU machine has no great-expectations);
- **atlas + normalize**: ``gpu_run.atlases_and_stats`` per batch (``write_atlases``: sphere OT assignment and the
  cached sphere->plane index of ``atlas_grid``; ``RunningStats`` of the batch), merged at the end into
  ``<out>/atlas/index.parquet`` and ``<out>/stats.npz`` (``RunningStats.merge``: Chan's parallel update, the same
  statistics as one pass).

Parameters come from ``params.yaml`` (``fit``, ``prune_check``, ``atlas``, ``normalize``, ``generate.render``), with
the paper-scale keys set by flags whose defaults are the paper's: ``--steps 1500 --views-per-step 4 --tau 36864``
(densification every 100 steps from step 100 to 0.8 x steps, as the paper-scale fits of bench_fit / gpu_run), fit
at the rendered side (``--fit-resolution 0``), atlas side ``--side 128`` (N = 16,384).

**How the stages overlap** (``--overlap pipeline``, the default; ``--overlap renders``: renders ahead as in
``pipeline``, but each batch's prune_check + atlas + normalize runs alone on the GPU right after its fit, before the
next fit starts; ``--overlap none`` runs the same work strictly one stage after the other, batch by batch, as the
baseline). Why ``renders``: in the first GPU run (H100, 2026-12-07) the atlas worker *process* beside the fit took
2.3 s per object (its kernels time-slice with the fit's context; the assignment alone takes 0.21-0.26 s) and slowed
the fit from 56.5 to ~40 objects/min, so the atlas, not the fit, set the pace (docs/benchmarks.md):

1. generation runs in ``--workers`` CPU processes (spawn, ``nice +--nice``, one torch thread each): every object is
   rendered (skipped when its folder is complete and from the same spec), loaded as float arrays and resized to the
   fit side in the worker, so the fit loop receives ready ``FitInput`` arrays. Batches k+1 .. k+``--prefetch`` are
   in the pool while batch k fits. The workers are niced because the packed fit is launch-bound: its one Python
   thread sets the pace, and the GPU run of 2026-12-02 fitted at half speed while renderer processes held the
   CPUs (docs/benchmarks.md: 135 vs 277 objects/min).
2. the fit of batch k runs in the main thread (the only thread that drives the fit's kernels).
3. prune_check + atlas + normalize of batch k run in ONE atlas worker while batch k+1 fits:
   ``--atlas-worker process`` (default; a spawned process with its own CUDA context) or ``thread`` (a thread of
   this process on its own CUDA stream). Why a process by default: both the fit and the auction solver are
   launch-bound Python loops (the auction takes ~28K bidding rounds at N = 16,384); in one process they share one
   GIL, so every atlas round steals time from the fit's critical path. A second process costs a CUDA context
   (~0.5 GB) and its kernels time-slice with the fit's on a GPU the fit leaves mostly idle. ``thread`` is there
   to measure the other side of that trade. The atlas worker also builds the plane index (once per N) while the
   first batch fits. A bounded queue (``--atlas-queue``) stops the fit from running ahead of the atlases.

**Resume**: a batch is finished when its marker ``<out>/batches/b<k>.json`` exists (written atomically, last, by the
atlas worker: it holds the batch's timings and per-object rows). A rerun of the same command skips finished batches
entirely; inside an unfinished one it skips rendered objects (the generator's spec hash), fitted objects (the fit
stage's ``config_hash``; the batch's remaining objects are fitted together) and built atlases (``write_atlases``'
stamps). A killed run loses at most the batches in flight.

**Reported** (``--json``, through ``benchmarks/_record.py``: device, versions, commit, command): per stage objects/min
and busy seconds (generate: summed worker seconds, its rate the pool's at ``--workers``; fit; prune_check; atlas;
normalize), the seconds the fit waited for renders and for the atlas queue, overall objects/min over this
invocation's wall clock, GPU utilisation sampled every second (nvidia-smi, else ``torch.cuda.utilization``; said when
neither works), peak GPU memory (torch's peak of both processes, nvidia-smi's peak of the whole GPU), the fit's
held-out PSNR summary, prune_check's acceptance rate and whether the stage's gate (``max_rejected_fraction``) would
pass, the start-up (CUDA + gsplat) and the drain after the last fit. The record is rewritten after every batch
(``complete``: false until the end), so a run stopped by ``--max-minutes`` or a lease still leaves its numbers.
``benchmarks/device/e2e_session.sh`` starts it on a leased GPU machine as a daemon; ``e2e_poll.sh`` collects it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "src"), str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _overrides import parse_overrides, with_overrides  # noqa: E402
from _record import write_record  # noqa: E402  (atomic: a poll never reads half a record)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".e2e", help="working folder (resumable)")
    ap.add_argument("--json", type=Path, default=None, help="raw record (rewritten after every batch)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--objects", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128, help="objects packed into one fit (128: the fastest size the H200 sweep measured)")
    g = ap.add_argument_group("generate")
    g.add_argument("--resolution", type=int, default=256, help="render side")
    g.add_argument("--views", type=int, default=32, help="views per object (every fit.holdout_every-th held out)")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 4), help="render processes")
    g.add_argument("--nice", type=int, default=10, help="niceness of the render processes")
    g.add_argument("--prefetch", type=int, default=2, help="batches rendered ahead of the one fitting")
    g = ap.add_argument_group("fit (defaults: the paper-scale keys; the rest from params.yaml: fit)")
    g.add_argument("--steps", type=int, default=1500)
    g.add_argument("--views-per-step", type=int, default=4)
    g.add_argument("--tau", type=int, default=36_864)
    g.add_argument("--init-points", type=int, default=4096)
    g.add_argument("--fit-resolution", type=int, default=0, help="fit side (0 = as rendered)")
    g.add_argument("--fit-set", default="", help="more fit settings as dotted overrides, after the flags above: "
                   "'densify.refine_every=50,lr_means=5.6e-4' (bench_fit --variants' syntax)")
    g = ap.add_argument_group("prune_check / atlas (the rest from params.yaml)")
    g.add_argument("--psnr-floor", type=float, default=None, help="override prune_check.psnr_floor (dB)")
    g.add_argument("--gate", choices=["auto", "gx", "plain"], default="auto",
                   help="prune_check's suite by great-expectations (gx), by pandas (plain), or gx when installed")
    g.add_argument("--side", type=int, default=128, help="atlas side (N = side^2)")
    g.add_argument("--atlas-method", default="auto", help="assignment solver (auto: auction on the GPU)")
    g.add_argument("--atlas-batch", type=int, default=16, help="objects per batched assignment (gpu_run's 16)")
    g = ap.add_argument_group("overlap")
    g.add_argument("--overlap", choices=["pipeline", "renders", "none"], default="pipeline",
                   help="pipeline: renders ahead + atlas of batch k beside the fit of k+1; renders: renders ahead, "
                        "atlas after each fit; none: one stage after the other")
    g.add_argument("--atlas-worker", choices=["process", "thread"], default="process")
    g.add_argument("--atlas-queue", type=int, default=2, help="fitted batches waiting for the atlas worker at most")
    g.add_argument("--atlas-threads", type=int, default=2, help="CPU threads of the atlas worker process")
    g.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no new fit after this many minutes of this invocation (0 = none); the rest resumes")
    return ap


# --------------------------------------------------------------------------- configuration


def configs(args, out: Path) -> dict[str, Any]:
    """params.yaml's sections with the paper-scale keys and the flags' overrides."""
    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import HoldoutConfig, ProceduralConfig
    from gaussian_atlas.prune import PruneCheckConfig
    from stages.common import load_params
    from stages.fit import fit_config

    params = load_params(None, args.params)
    fcfg, _runner = fit_config(params["fit"])
    fcfg = replace(fcfg, steps=args.steps, views_per_step=args.views_per_step, tau=args.tau,
                   init_points=args.init_points, resolution=args.fit_resolution, batch_objects=args.batch,
                   max_seconds=0.0, densify=replace(fcfg.densify, refine_start_iter=100, refine_every=100,
                                                    refine_stop_iter=int(0.8 * args.steps)))
    if args.fit_set:  # an arm of bench_fit --variants (e.g. picked by benchmarks/pick_fit_arm.py)
        fcfg = with_overrides(fcfg, parse_overrides(args.fit_set), "--fit-set")
    gen = params["generate"]
    render = dict(gen["render"])
    views = {**render.pop("views"), "n_views": args.views, "resolution": args.resolution}
    views["n_ring"] = min(int(views["n_ring"]), args.views)
    pcfg = ProceduralConfig(n_objects=args.objects, composition_fraction=float(gen["composition_fraction"]),
                            seed=int(gen["seed"]), render=RenderConfig(**render, views=views), workers=0,
                            holdout=HoldoutConfig())  # no held-out prompts: every object is a training object
    section = {k: v for k, v in params["atlas"].items() if k not in ("batch_objects", "device")}
    section.update(side=args.side, method=args.atlas_method, grid=None, cache_dir=str(out / "atlas_cache"))
    acfg = from_dict(AtlasConfig, section, "params.yaml: atlas", complete=True)
    prune = {**params["prune_check"], "tau": fcfg.tau}
    if args.psnr_floor is not None:
        prune["psnr_floor"] = args.psnr_floor
    qcfg = from_dict(PruneCheckConfig, prune, "params.yaml: prune_check", complete=True)
    return {"fit": fcfg, "procedural": pcfg, "atlas": acfg, "prune_check": qcfg,
            "std_floor": float(params["normalize"]["std_floor"])}


def shard_of(index: int) -> str:
    return f"shard-{index // 1000:05d}"  # the ingest stage's shard names (ingest.shard_size 1000)


# --------------------------------------------------------------------------- generate (CPU worker processes)


def _render_worker_init(nice: int) -> None:
    import torch  # noqa: F401  (the worker's load step uses torch: imported once here, then limited with the rest)

    from gaussian_atlas.procedural import render_worker_init

    render_worker_init(nice)


def _atlas_worker_init(threads: int) -> None:
    """The atlas worker process: ``threads`` CPU threads for torch and BLAS. Unlimited, its torch took every core
    for the dense neighbour distances of ``neighbour_coherence`` (since replaced by a k-d tree) beside the fit's one
    launch thread; in the first H100 run the fit slowed from 56.5 to ~40 objects/min while the atlas worker ran."""
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        return
    threadpool_limits(limits=threads)


def produce(spec: dict, obj_dir: str, render_cfg: Any, fit_side: int) -> dict:
    """Render one object unless its folder is complete and from the same spec (the generator's own check), then
    load it as the fit's arrays, resized to the fit side. Runs in a render worker."""
    from gaussian_atlas.data import load_object
    from gaussian_atlas.fit import FitInput, input_stamp, resize_views
    from gaussian_atlas.procedural import _render_one, _up_to_date

    t0, w0 = time.perf_counter(), time.time()
    rendered = not _up_to_date(Path(obj_dir), spec, render_cfg)
    if rendered:
        _render_one(spec, obj_dir, render_cfg)
    t1 = time.perf_counter()
    fi = resize_views(FitInput.from_loaded(spec["id"], load_object(obj_dir)), fit_side)
    stamp = input_stamp(obj_dir)
    t2 = time.perf_counter()
    return {"input": fi, "stamp": stamp, "rendered": rendered, "render_s": t1 - t0, "load_s": t2 - t1,
            "start": w0, "end": time.time()}


# --------------------------------------------------------------------------- prune_check


def plain_verdict(table: Any, cfg: Any) -> dict[int, list[str]]:
    """prune_check's suite (:func:`gaussian_atlas.checks.prune_checks`) read by pandas instead of great-expectations:
    the same expectations (values in a set, values between bounds — missing values pass those, as great-expectations
    skips nulls — and values not null), the same reasons, a failed fit reported by its own reason only. Returns row -> reasons."""
    import pandas as pd

    from gaussian_atlas.checks import prune_checks

    frame = table.reset_index(drop=True).copy()
    for col in ("n_gaussians", "n_nonfinite", "psnr", "log_scale_min", "log_scale_max", "frac_transparent",
                "extent", "reason"):
        if col not in frame:
            frame[col] = float("nan") if col != "reason" else ""
    failed = frame["status"] != "ok"
    reasons: dict[int, list[str]] = {}
    for check in prune_checks(cfg):
        name, kw = check.expectation
        col = frame[kw["column"]]
        if name == "ExpectColumnValuesToBeInSet":
            bad = col.notna() & ~col.isin(kw["value_set"])
        elif name == "ExpectColumnValuesToNotBeNull":
            bad = col.isna()
        elif name == "ExpectColumnValuesToBeBetween":
            v = pd.to_numeric(col, errors="coerce")
            bad = pd.Series(False, index=frame.index)
            if kw.get("min_value") is not None:
                bad |= v < kw["min_value"]
            if kw.get("max_value") is not None:
                bad |= v > kw["max_value"]
        else:  # pragma: no cover - a new kind of expectation in the suite
            raise ValueError(f"plain prune_check cannot read {name}; run with --gate gx")
        for r in frame.index[bad]:
            if failed[r] and not check.after_read_error:
                continue
            reasons.setdefault(int(r), []).append(check.reason(frame.loc[r].to_dict()))
    return reasons


def gate_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import great_expectations  # noqa: F401
    except ImportError:
        return "plain"
    return "gx"


# ------------------------------------------------------------------- the atlas worker: prune_check, atlas, normalize

_STREAMS: dict[int, Any] = {}


def _stream_ctx(device: str, own_stream: bool):
    import torch

    if not own_stream or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    s = _STREAMS.setdefault(threading.get_ident(), torch.cuda.Stream())
    return torch.cuda.stream(s)


def atlas_prepare(acfg: Any, device: str, own_stream: bool) -> dict:
    """The plane index (solved once per N and cached), while the first batch fits."""
    from gaussian_atlas.atlas import atlas_grid

    t = time.perf_counter()
    with _stream_ctx(device, own_stream):
        atlas_grid(acfg, device)
        _sync(device)
    return {"grid_s": time.perf_counter() - t}


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.current_stream().synchronize()


def atlas_batch(job: dict) -> dict:
    """prune_check, atlas and normalize of one fitted batch; writes its marker ``batches/b<k>.json`` last."""
    import pandas as pd
    import torch

    import gpu_run
    from gaussian_atlas import io as gio

    device, root = job["device"], Path(job["out"])
    t0 = time.perf_counter()
    table = pd.DataFrame(job["rows"])
    if job["gate"] == "gx":
        from gaussian_atlas.checks import validate_fits

        reasons = validate_fits(table, job["prune_check"])["reasons"]
    else:
        reasons = plain_verdict(table, job["prune_check"])
    accepted = [r for i, r in enumerate(job["rows"]) if i not in reasons]
    t_prune = time.perf_counter() - t0

    name = f"b{job['k']:05d}"
    timings: dict[str, float] = {"atlas_s": 0.0, "normalize_s": 0.0}
    items = [{"id": r["id"], "shard": r["shard"], "src": str(root / "fits" / r["ply"]),
              "caption": job["captions"][r["id"]], "split": "train"} for r in accepted]
    n_atlas, quarantine, count = 0, [], 0
    if str(device).startswith("cuda") and not job["own_stream"]:
        torch.cuda.reset_peak_memory_stats()  # this batch's peak in the atlas process (a thread shares the fit's)
    if items:
        with _stream_ctx(device, job["own_stream"]):
            try:
                index, quarantine = gpu_run.atlases_and_stats(items, job["atlas"], root / "atlas" / name,
                                                              root / "atlas" / name / "stats.npz", device=device,
                                                              timings=timings, progress=False,
                                                              batch=job["atlas_batch"])
                n_atlas = count = len(index)
            except ValueError as exc:  # every accepted fit quarantined: the batch has no statistics
                if "RunningStats is empty" not in str(exc):
                    raise
                quarantine = [{"id": r["id"], "reason": "quarantined by write_atlases"} for r in accepted]
            _sync(device)
    rows = [{"id": r["id"], "status": r["status"], "psnr": r.get("psnr"), "ssim": r.get("ssim"),
             "n_gaussians": r.get("n_gaussians"), "accepted": i not in reasons,
             "reasons": "; ".join(reasons.get(i, []))} for i, r in enumerate(job["rows"])]
    record = {"k": job["k"], "ids": [r["id"] for r in job["rows"]], "n": len(job["rows"]),
              "generate": job["generate"], "fit": job["fit"],
              "prune_check": {"busy_s": t_prune, "gate": job["gate"], "n_accepted": len(accepted),
                              "n_rejected": len(reasons)},
              "atlas": {"busy_s": timings["atlas_s"], "n": n_atlas, "quarantined": quarantine,
                        "parts": timings.get("atlas_parts", {})},
              "normalize": {"busy_s": timings["normalize_s"], "count": count},
              "atlas_worker": {"pid": os.getpid(), "mode": "thread" if job["own_stream"] else "process",
                               "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30
                               if str(device).startswith("cuda") else None,
                               "end": time.time()},
              "objects": rows}
    gio.write_json(root / "batches" / f"{name}.json", record)
    return record


# --------------------------------------------------------------------------- GPU utilisation


class GpuMonitor:
    """Samples GPU utilisation (and memory in use) every ``period`` s in a thread: nvidia-smi (the whole GPU, every
    process), else ``torch.cuda.utilization`` (NVML); says why when neither works or the device is not a GPU."""

    def __init__(self, device: str, period: float = 1.0) -> None:
        self.device, self.period = device, period
        self.samples: list[tuple[float, float, float | None]] = []  # (time, util %, memory used MiB)
        self.source: str | None = None
        self.note = ""
        self._stop = threading.Event()
        self._proc = None
        self._thread: threading.Thread | None = None
        self.t0 = time.time()

    def start(self) -> "GpuMonitor":
        import shutil
        import subprocess

        if not self.device.startswith("cuda"):
            self.note = f"not sampled: device {self.device}"
            return self
        idx = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        if shutil.which("nvidia-smi"):
            try:
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     "-lms", str(int(self.period * 1000)), "-i", idx], stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
                self.source = f"nvidia-smi -i {idx} every {self.period:g} s"
                self._thread = threading.Thread(target=self._read_smi, daemon=True)
                self._thread.start()
                return self
            except OSError as exc:
                self.note = f"nvidia-smi failed: {exc}; "
        try:
            import torch

            torch.cuda.utilization()
            self.source = f"torch.cuda.utilization every {self.period:g} s (this process's view of the GPU)"
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
            self._thread.start()
        except Exception as exc:  # no NVML (pynvml) in this environment
            self.note += f"not sampled: no nvidia-smi and torch.cuda.utilization failed ({type(exc).__name__}: {exc})"
        return self

    def _read_smi(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            try:
                u, m = (float(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), u, m))

    def _poll_torch(self) -> None:
        import torch

        while not self._stop.wait(self.period):
            try:
                self.samples.append((time.time(), float(torch.cuda.utilization()), None))
            except Exception:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(Exception):
                self._proc.wait(5)

    def summary(self, windows: dict[str, tuple[float, float]] | None = None) -> dict:
        import numpy as np

        out: dict[str, Any] = {"source": self.source, "note": self.note or None, "n_samples": len(self.samples)}
        if not self.samples:
            return out
        t = np.array([s[0] for s in self.samples])
        u = np.array([s[1] for s in self.samples])
        out.update(mean=float(u.mean()), p10=float(np.percentile(u, 10)), median=float(np.median(u)),
                   p90=float(np.percentile(u, 90)), share_samples_ge_50=float((u >= 50).mean()))
        mem = [s[2] for s in self.samples if s[2] is not None]
        if mem:
            out["memory_used_peak_mib"] = float(max(mem))
        for name, (a, b) in (windows or {}).items():
            sel = (t >= a) & (t <= b)
            if sel.any():
                out[f"mean_{name}"] = float(u[sel].mean())
        out["samples"] = [[round(s[0] - self.t0, 1), s[1], s[2]] for s in self.samples]
        return out


# --------------------------------------------------------------------------- the run


def fit_batch(inputs: list, items: list[dict], cfg: Any, fits_dir: Path, device: str) -> list[dict]:
    """Fit ``inputs`` (FitInput, same order as ``items``) as one packed batch and write each object's PLY and
    metrics JSON as the fit stage does (``fit_chunk``'s rows and files); a failing batch is fitted one by one."""
    from gaussian_atlas import io as gio
    from gaussian_atlas.fit import config_hash, fit_objects, fit_outputs, gaussian_stats, replace_batch
    from gaussian_atlas.gaussians import write_ply

    try:
        pairs = list(zip(items, fit_objects(inputs, cfg, device=device)))
    except Exception as exc:
        if len(inputs) == 1:
            it = items[0]
            return [{"id": it["id"], "shard": it["shard"], "status": "failed",
                     "reason": f"fit failed: {type(exc).__name__}: {exc}"}]
        log(f"fit: packed batch failed ({type(exc).__name__}: {exc}); fitting its objects one by one")
        one = replace_batch(cfg, 1)
        return [r for fi, it in zip(inputs, items) for r in fit_batch([fi], [it], one, fits_dir, device)]
    rows = []
    for it, res in pairs:
        ply, meta = fit_outputs(fits_dir, it["shard"], it["id"])
        row = {"id": it["id"], "shard": it["shard"], "status": "ok", "reason": "",
               "ply": str(ply.relative_to(fits_dir)), "config_hash": config_hash(cfg), "input_stamp": it["stamp"],
               "device": device, **res.metrics, **gaussian_stats(res.gaussians)}
        try:
            write_ply(ply, res.gaussians)
        except ValueError as exc:  # e.g. non-finite parameters: recorded, judged by prune_check
            row.update(status="failed", reason=f"cannot write PLY: {exc}")
        gio.write_json(meta, row)
        rows.append(row)
    return rows


def warm_gsplat(device: str) -> float:
    """Start CUDA and load (or JIT-build) gsplat's kernels with one tiny render before the first fit, while the first
    batches render, so that neither is counted in the first fit; returns its seconds (0 on the CPU)."""
    if not device.startswith("cuda"):
        return 0.0
    import torch

    from gaussian_atlas.render import render

    t = time.perf_counter()
    n = 64
    quats = torch.nn.functional.normalize(torch.randn(n, 4, device=device), dim=-1)
    splats = (torch.randn(n, 3, device=device) * 0.3, quats, torch.full((n, 3), 0.05, device=device),
              torch.full((n,), 0.5, device=device), torch.rand(n, 3, device=device))
    c2w = torch.eye(4, device=device)[None]
    c2w[0, 2, 3] = 3.0  # on +z, looking down -z at the origin (OpenGL)
    K = torch.tensor([[[64.0, 0.0, 32.0], [0.0, 64.0, 32.0], [0.0, 0.0, 1.0]]], device=device)
    float(render(splats, c2w, K, 64, 64).rgb.sum())
    return time.perf_counter() - t


def _stage(n: int, busy: float, workers: int = 1) -> dict:
    return {"n": n, "busy_s": round(busy, 3),
            "objects_per_min": round(60.0 * n * workers / busy, 2) if busy > 0 and n else None}


def summarize(records: list[dict], now: set[int], wall: float, args, cfg: dict, extra: dict) -> dict:
    """The raw record: per stage (this invocation's batches), overall, fit quality (every finished batch)."""
    import numpy as np

    mine = [r for r in records if r["k"] in now]
    n_now = sum(r["n"] for r in mine)
    n_fit_now = sum(r["fit"]["n_fitted"] for r in mine)
    gen_busy = sum(r["generate"]["render_s"] + r["generate"]["load_s"] for r in mine)
    stages = {
        "generate": {**_stage(sum(r["generate"]["n"] for r in mine), gen_busy, args.workers),
                     "n_rendered": sum(r["generate"]["n_rendered"] for r in mine),
                     "render_s": round(sum(r["generate"]["render_s"] for r in mine), 3),
                     "load_s": round(sum(r["generate"]["load_s"] for r in mine), 3), "workers": args.workers,
                     "rate_note": "objects/min of the pool: summed worker seconds / workers"},
        "fit": {**_stage(sum(r["fit"]["n_fitted"] for r in mine), sum(r["fit"]["busy_s"] for r in mine)),
                "waited_for_inputs_s": round(sum(r["fit"]["waited_s"] for r in mine), 3),
                "waited_for_atlas_queue_s": round(sum(r["fit"].get("queue_wait_s", 0.0) for r in mine), 3)},
        "prune_check": _stage(n_now, sum(r["prune_check"]["busy_s"] for r in mine)),
        "atlas": {**_stage(sum(r["prune_check"]["n_accepted"] for r in mine), sum(r["atlas"]["busy_s"] for r in mine)),
                  "grid_s": extra.get("grid_s"),
                  "parts_s": {key: round(sum(r["atlas"].get("parts", {}).get(key, 0.0) for r in mine), 3)
                              for key in ("read_s", "build_s", "coherence_s", "write_s")}},
        "normalize": {**_stage(sum(r["normalize"]["count"] for r in mine), sum(r["normalize"]["busy_s"] for r in mine)
                               + extra.get("merge_s", 0.0)), "merge_s": round(extra.get("merge_s", 0.0), 3)},
    }
    objs = [o for r in records for o in r["objects"]]
    ok = [o for o in objs if o["status"] == "ok" and o["psnr"] is not None]
    psnr = np.array([o["psnr"] for o in ok], dtype=float)
    quality = {"n_objects": len(objs), "n_fit_ok": len(ok),
               "n_accepted": sum(o["accepted"] for o in objs),
               "acceptance_rate": round(sum(o["accepted"] for o in objs) / len(objs), 4) if objs else None,
               "rejections": sorted({o["reasons"] for o in objs if o["reasons"]})[:20],
               # the prune_check stage fails above max_rejected_fraction (here: recorded, the run goes on)
               "gate_passes": (1 - sum(o["accepted"] for o in objs) / len(objs)
                               <= cfg["prune_check"].max_rejected_fraction) if objs else None,
               "n_atlases": sum(r["atlas"]["n"] for r in records)}
    if len(psnr):
        quality["psnr"] = {"mean": float(psnr.mean()), "min": float(psnr.min()), "p10": float(np.percentile(psnr, 10)),
                           "median": float(np.median(psnr)), "p90": float(np.percentile(psnr, 90)),
                           "max": float(psnr.max())}
        quality["n_gaussians"] = {"mean": float(np.mean([o["n_gaussians"] for o in ok])),
                                  "max": int(max(o["n_gaussians"] for o in ok))}
    return {"benchmark": "bench_data_e2e", "complete": False, "objects": args.objects, "batch": args.batch,
            "overlap": args.overlap, "atlas_worker": args.atlas_worker,
            "batches_total": -(-args.objects // args.batch), "batches_done": len(records),
            "batches_done_now": len(mine),
            "overall": {"wall_s": round(wall, 2), "objects_done_now": n_now, "objects_fitted_now": n_fit_now,
                        "objects_per_min": round(60.0 * n_fit_now / wall, 2) if wall > 0 and n_fit_now else None,
                        "note": "objects fitted in this invocation and taken through every later stage, over its wall "
                                "clock (start-up, gsplat load, the last atlases and the final merge included); a "
                                "resumed invocation counts only the objects it fitted itself"},
            "stages": stages, "quality": quality,
            "other_s": {"gsplat_ready_s": extra.get("gsplat_ready_s"), "atlas_drain_s": extra.get("atlas_drain_s"),
                        "note": "start-up: CUDA + gsplat's kernels (loaded or JIT-built) beside the first renders; "
                                "drain: the last atlases after the last fit"},
            "normalize_result": extra.get("normalize_result"),
            "config": {"fit": asdict(cfg["fit"]), "procedural": asdict(cfg["procedural"]),
                       "atlas": asdict(cfg["atlas"]), "prune_check": asdict(cfg["prune_check"]),
                       "std_floor": cfg["std_floor"], "args": {k: str(v) for k, v in vars(args).items()}},
            **extra.get("facts", {})}


def merge_outputs(root: Path, records: list[dict], std_floor: float) -> tuple[dict, float]:
    """normalize's end: every batch's statistics merged into ``stats.npz``, its index into ``atlas/index.parquet``."""
    import pandas as pd

    from gaussian_atlas import io as gio
    from gaussian_atlas.normalize import RunningStats

    t = time.perf_counter()
    stats, frames = RunningStats(std_floor=std_floor), []
    for r in sorted(records, key=lambda r: r["k"]):
        d = root / "atlas" / f"b{r['k']:05d}"
        if (d / "stats.npz").exists():
            stats.merge(RunningStats.load(d / "stats.npz"))
        if (d / "index.parquet").exists():
            f = pd.read_parquet(d / "index.parquet")
            f["path"] = f"b{r['k']:05d}/" + f["path"]
            frames.append(f)
    out: dict[str, Any] = {"count": stats.count}
    if frames:
        gio.write_parquet(root / "atlas" / "index.parquet", pd.concat(frames, ignore_index=True))
    if stats.count:
        stats.save(root / "stats.npz")
        out["floored_fraction"] = stats.floored_fraction()
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    t_start, w_start = time.perf_counter(), time.time()
    from _prebuilt import use_prebuilt_gsplat

    prebuilt = use_prebuilt_gsplat()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    import torch

    from gaussian_atlas.config import resolve_device
    from gaussian_atlas.fit import fit_outputs, is_done
    from gaussian_atlas.io import read_json, remove_stale_temps
    from gaussian_atlas.procedural import object_specs

    device = resolve_device(args.device)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    cfg = configs(args, root)
    fcfg, pcfg, acfg = cfg["fit"], cfg["procedural"], cfg["atlas"]
    gate = gate_mode(args.gate)
    specs = object_specs(pcfg)
    captions = {s["id"]: s["caption"] for s in specs}
    items = [{"id": s["id"], "shard": shard_of(i)} for i, s in enumerate(specs)]
    batches = [list(range(i, min(i + args.batch, len(specs)))) for i in range(0, len(specs), args.batch)]
    fits_dir, obj_dir = root / "fits", root / "procedural" / "objects"
    for folder in [obj_dir, root / "batches", *{fits_dir / "objects" / it["shard"] for it in items}]:
        remove_stale_temps(folder)  # what a killed run left half-written
    done = {int(p.stem[1:]): read_json(p) for p in sorted((root / "batches").glob("b*.json"))}
    done = {k: r for k, r in done.items() if k < len(batches) and r.get("ids") == [items[i]["id"] for i in batches[k]]}
    todo = [k for k in range(len(batches)) if k not in done]
    facts = {"device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
             "cuda": torch.version.cuda, "gsplat_prebuilt": prebuilt, "gate_used": gate,
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(w_start)) + " UTC"}
    with contextlib.suppress(Exception):
        import gsplat

        facts["gsplat"] = gsplat.__version__
    log(f"e2e: {len(specs)} objects in {len(batches)} batches of {args.batch} ({len(done)} finished earlier), "
        f"device {facts['device_name']}, overlap {args.overlap}, atlas worker {args.atlas_worker}, "
        f"{args.workers} render workers, fit {fcfg.steps} steps x {fcfg.views_per_step} views, tau {fcfg.tau}, "
        f"{args.resolution}px x {args.views} views, atlas side {acfg.side}, prune_check by {gate}")

    monitor = GpuMonitor(device).start()
    if monitor.note:
        log(f"gpu utilisation: {monitor.note}")
    spawn = mp.get_context("spawn")
    renderers = ProcessPoolExecutor(max_workers=args.workers, mp_context=spawn, initializer=_render_worker_init,
                                    initargs=(args.nice,))
    own_stream = args.atlas_worker == "thread"
    atlas_pool = (ThreadPoolExecutor(max_workers=1) if own_stream else
                  ProcessPoolExecutor(max_workers=1, mp_context=spawn, initializer=_atlas_worker_init,
                                      initargs=(args.atlas_threads,)))
    grid_future = atlas_pool.submit(atlas_prepare, acfg, device, own_stream)

    futures: dict[int, dict[int, Any]] = {}  # batch -> object index -> future (objects that still need a fit)

    def need_fit(i: int) -> bool:
        return not is_done(fits_dir, items[i]["shard"], items[i]["id"], fcfg)

    def submit(k: int) -> None:
        if k in futures or k >= len(batches) or k in done:
            return
        futures[k] = {i: renderers.submit(produce, specs[i], str(obj_dir / specs[i]["id"]), pcfg.render,
                                          fcfg.resolution) for i in batches[k] if need_fit(i)}

    records = dict(done)
    now: set[int] = set()
    pending: list[tuple[int, Any]] = []  # (batch, atlas future)
    extra: dict[str, Any] = {"facts": facts}
    fit_window = [None, None]

    def collect(block: bool = False, keep: int | None = None) -> None:
        """Take finished atlas batches (all, or wait until at most ``keep`` are pending)."""
        while pending and (pending[0][1].done() or (block and (keep is None or len(pending) > keep))):
            k, fut = pending.pop(0)
            records[k] = fut.result()
            now.add(k)

    def record(complete: bool = False) -> dict:
        wall = time.perf_counter() - t_start
        gpu = {"utilisation": monitor.summary({"fit": tuple(fit_window)} if fit_window[0] else None)}
        if device.startswith("cuda"):
            peaks = [r["atlas_worker"]["peak_allocated_gib"] for r in records.values() if r["k"] in now and
                     r["atlas_worker"].get("mode") == "process" and r["atlas_worker"]["peak_allocated_gib"] is not None]
            gpu.update(peak_allocated_gib_main=torch.cuda.max_memory_allocated() / 2**30,
                       peak_reserved_gib_main=torch.cuda.max_memory_reserved() / 2**30,
                       peak_allocated_gib_atlas_process=max(peaks) if peaks else None)
        res = summarize(list(records.values()), now, wall, args, cfg, extra)
        res["gpu_usage"] = gpu  # ("gpu" is run_facts' device name)
        res["complete"] = complete
        write_record(args.json, res)
        return res

    stopped_early, n_fit_now = False, 0
    try:
        ahead_ok = args.overlap in ("pipeline", "renders")  # renders of the next batches while one fits
        for k in todo[:1 + (args.prefetch if ahead_ok else 0)]:
            submit(k)  # the renders start, then CUDA and gsplat, beside them
        extra["gsplat_ready_s"] = round(warm_gsplat(device), 3)
        for j, k in enumerate(todo):
            if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
                stopped_early = True
                log(f"e2e: --max-minutes {args.max_minutes:g} reached: no new fit; a rerun resumes at batch {k}")
                break
            # 1. inputs of batch k (submitted earlier: rendered while the previous batch fitted)
            submit(k)
            if ahead_ok:
                for ahead in todo[j + 1:j + 1 + args.prefetch]:
                    submit(ahead)
            t_wait = time.perf_counter()
            got, broken = {}, {}
            for i, f in futures.pop(k).items():
                try:
                    got[i] = f.result()
                except Exception as exc:  # an object that cannot be rendered or loaded: failed, the rest go on
                    broken[items[i]["id"]] = {**items[i], "status": "failed",
                                              "reason": f"cannot render/load: {type(exc).__name__}: {exc}"}
            waited = time.perf_counter() - t_wait
            gen = {"n": len(got), "n_rendered": sum(g["rendered"] for g in got.values()),
                   "render_s": sum(g["render_s"] for g in got.values()),
                   "load_s": sum(g["load_s"] for g in got.values()),
                   "span": [min((g["start"] for g in got.values()), default=None),
                            max((g["end"] for g in got.values()), default=None)]}
            # 2. fit (main thread, GPU); objects fitted by an earlier, killed invocation are read back
            t_fit = time.perf_counter()
            fit_window[0] = fit_window[0] or time.time()
            order = sorted(got)
            fitted = fit_batch([got[i]["input"] for i in order],
                               [{**items[i], "stamp": got[i]["stamp"]} for i in order], fcfg, fits_dir, device) \
                if order else []
            by_id = {**broken, **{r["id"]: r for r in fitted}}
            rows = [by_id.get(items[i]["id"]) or read_json(fit_outputs(fits_dir, items[i]["shard"], items[i]["id"])[1])
                    for i in batches[k]]
            fit_s = time.perf_counter() - t_fit
            fit_window[1] = time.time()
            del got
            # 3. prune_check + atlas + normalize of batch k on the atlas worker, while batch k+1 fits
            t_q = time.perf_counter()
            collect(block=True, keep=max(0, args.atlas_queue - 1) if args.overlap == "pipeline" else 0)
            job = {"k": k, "rows": rows, "out": str(root), "device": device, "gate": gate, "own_stream": own_stream,
                   "atlas_batch": args.atlas_batch, "prune_check": cfg["prune_check"], "atlas": acfg,
                   "captions": {r["id"]: captions[r["id"]] for r in rows},
                   "generate": gen, "fit": {"n_fitted": len(order), "busy_s": fit_s, "waited_s": waited,
                                            "queue_wait_s": time.perf_counter() - t_q}}
            pending.append((k, atlas_pool.submit(atlas_batch, job)))
            if args.overlap != "pipeline":  # the atlas of batch k alone on the GPU, before the fit of k+1
                collect(block=True, keep=0)
            collect()
            # progress
            wall = time.perf_counter() - t_start
            n_fit_now += len(order)
            n_left = sum(len(batches[b]) for b in todo[j + 1:])
            rate = 60.0 * n_fit_now / wall
            eta = f"{int(n_left / rate) // 60}:{int(n_left / rate) % 60:02d}" if rate > 0 else "?"
            n_atlas = sum(r["n"] for r in records.values())
            ok = [r["psnr"] for r in rows if r.get("status") == "ok" and r.get("psnr") is not None]
            log(f"e2e: batch {k + 1}/{len(batches)} fitted in {fit_s:.1f} s (waited {waited:.1f} s for renders) | "
                f"fitted {len(specs) - n_left}/{len(specs)}, through the atlas {n_atlas}/{len(specs)} | "
                f"{rate:.1f} obj/min fitted now / wall, fit {60 * len(order) / max(fit_s, 1e-9):.1f} obj/min busy | "
                f"batch PSNR mean {sum(ok) / max(1, len(ok)):.2f} dB | ETA {eta} (h:min)")
            record()
        t_drain = time.perf_counter()
        collect(block=True, keep=0)
        extra["atlas_drain_s"] = round(time.perf_counter() - t_drain, 3)
        with contextlib.suppress(Exception):
            extra["grid_s"] = round(grid_future.result()["grid_s"], 3)
        complete = len(records) == len(batches)
        if complete:
            merged, extra["merge_s"] = merge_outputs(root, list(records.values()), cfg["std_floor"])
            extra["normalize_result"] = merged
    finally:
        monitor.stop()
        renderers.shutdown(wait=False, cancel_futures=True)
        atlas_pool.shutdown(wait=True, cancel_futures=True)
    res = record(complete=complete and not stopped_early)
    st, q = res["stages"], res["quality"]
    log("e2e: " + ("done" if res["complete"] else f"stopped: {len(records)}/{len(batches)} batches finished") +
        f" in {res['overall']['wall_s']:.0f} s: {res['overall']['objects_per_min']} obj/min wall; " +
        ", ".join(f"{n} {s['objects_per_min']} obj/min ({s['busy_s']:.0f} s busy)" for n, s in st.items()) +
        f"; fit waited {st['fit']['waited_for_inputs_s']:.0f} s for renders"
        f"; accepted {q['n_accepted']}/{q['n_objects']}"
        + (f", PSNR mean {q['psnr']['mean']:.2f} dB (min {q['psnr']['min']:.2f})" if "psnr" in q else "")
        + f"; GPU utilisation mean {res['gpu_usage']['utilisation'].get('mean')}"
        + (f" -> {args.json}" if args.json else ""))
    return res


if __name__ == "__main__":
    main()
