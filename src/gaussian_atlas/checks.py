"""Data validation between stages with great-expectations.

Each stage describes what it read or made as a table (one row per object)
and runs an expectation suite over it. :func:`run_suite` returns, for every
row that failed, the human-readable reasons, so the caller can quarantine
exactly those objects and keep the rest. Data docs (HTML) are built into
``docs_dir`` when given.

great-expectations is imported lazily: the rest of the library works without it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

__all__ = ["Check", "run_suite", "validate_ingest_facts"]

ROW = "row"  # the index column every validated table carries
LISTED_ROWS = 20  # failing rows listed per expectation on the offline data docs index


@dataclass(frozen=True)
class Check:
    """One expectation plus how to explain a failing row to a person.

    ``expectation`` is a ``(class name in gx.expectations, kwargs)`` pair so
    this module imports great-expectations only when a suite runs;
    ``reason(row)`` builds the message from the row's values (a ``dict``).
    ``after_read_error``: report this check even when the row already has a
    ``read_error`` (checks that do not depend on reading the images).
    """

    expectation: tuple[str, dict[str, Any]]
    reason: Callable[[dict[str, Any]], str]
    after_read_error: bool = False


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def run_suite(frame: pd.DataFrame, suite_name: str, checks: list[Check],
              docs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate ``frame`` against ``checks`` with great-expectations.

    Parameters
    ----------
    frame : table to validate; must have an integer column ``row`` that is unique.
    suite_name : name of the expectation suite (shown in the data docs).
    checks : the expectations and their reasons.
    docs_dir : when given, the data docs site (``index.html`` and pages) is
        written there, replacing what was there.

    Returns
    -------
    dict with ``success`` (bool), ``reasons`` (row -> list of messages, failing
    rows only), ``expectations`` (name -> number of failing rows) and
    ``docs_index`` (path of the data docs' ``index.html`` or ``None``).
    """
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if ROW not in frame.columns or not frame[ROW].is_unique:
        raise ValueError(f"run_suite needs a unique '{ROW}' column")
    project = Path(tempfile.mkdtemp(prefix="gx-"))
    try:
        ctx = gx.get_context(mode="file", project_root_dir=str(project))
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.variables.save()
        source = ctx.data_sources.add_pandas(suite_name)
        batch_def = source.add_dataframe_asset("table").add_batch_definition_whole_dataframe("all")
        suite = gx.ExpectationSuite(name=suite_name)
        for check in checks:
            cls_name, kwargs = check.expectation
            suite.add_expectation(getattr(gx.expectations, cls_name)(**kwargs))
        suite = ctx.suites.add(suite)
        vdef = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch_def, suite=suite, name=suite_name))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if docs_dir else []
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"{suite_name}_checkpoint", validation_definitions=[vdef], actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
        ))
        result = checkpoint.run(batch_parameters={"dataframe": frame})

        # Match each result back to its Check by position: suites keep insertion order.
        rows_by_id = {int(r[ROW]): r for r in frame.to_dict("records")}
        reasons: dict[int, list[str]] = {}
        counts: dict[str, int] = {}
        listed: dict[str, list[tuple[Any, Any, str]]] = {}  # name -> (id, value, reason) of its first failing rows
        (vres,) = result.run_results.values()
        for check, res in zip(checks, vres.results):
            column = res.expectation_config.kwargs.get("column", "")
            name = f"{res.expectation_config.type}({column})"
            bad = [int(u[ROW]) for u in (res.result.get("unexpected_index_list") or [])]
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise RuntimeError(f"expectation {name} could not run: {res.exception_info.get('exception_message')}")
            counts[name] = len(bad)
            listed[name] = []
            for r in bad:
                row = rows_by_id[r]
                if _present(row.get("read_error")) and not check.after_read_error:
                    why = f"not checked: {row['read_error']}"  # its own error is its reason
                else:
                    why = check.reason(row)
                    reasons.setdefault(r, []).append(why)
                if len(listed[name]) < LISTED_ROWS:
                    listed[name].append((row["id"] if "id" in row else r, row.get(column), why))
        docs_index = None
        if docs_dir:
            site = project / "gx" / "uncommitted" / "data_docs" / "local_site"
            docs_dir = Path(docs_dir)
            if docs_dir.exists():
                shutil.rmtree(docs_dir)
            shutil.copytree(site, docs_dir)
            docs_index = str(_offline_index(docs_dir, suite_name, bool(result.success), counts, checks, listed))
        return {"success": bool(result.success), "reasons": reasons, "expectations": counts,
                "docs_index": docs_index}
    finally:
        shutil.rmtree(project, ignore_errors=True)


def _offline_index(docs_dir: Path, suite_name: str, success: bool, counts: dict[str, int],
                   checks: list[Check], listed: dict[str, list[tuple[Any, Any, str]]] | None = None) -> Path:
    """An ``index.html`` that reads offline: great-expectations' own index fills its list with scripts and
    styles from CDNs (an empty, unstyled page without internet), so it is kept as ``gx_index.html`` and this
    static page, with no external reference, lists the verdict, every expectation with its failing rows (``listed``:
    expectation -> ``(id, value, reason)`` of its first :data:`LISTED_ROWS` failing rows) and links the site's
    validation and suite pages (those render without scripts)."""
    import html
    import json

    e = html.escape
    gx_index = docs_dir / "index.html"
    if gx_index.exists():
        gx_index.replace(docs_dir / "gx_index.html")
    bounds = {name: json.dumps({k: v for k, v in c.expectation[1].items() if k != "column"}, default=str)
              for name, c in zip(counts, checks)}
    rows = "".join(
        f"<tr class='{'bad' if n else 'ok'}'><td><code>{e(name)}</code></td><td>{n}</td><td>{e(bounds[name])}</td></tr>"
        for name, n in counts.items())
    failing = ""
    for name, items in (listed or {}).items():
        if not items:
            continue
        more = counts[name] - len(items)
        failing += (f"<h3><code>{e(name)}</code> {e(bounds[name])}: {counts[name]} failing row(s)</h3>"
                    "<table><tr><th>id</th><th>value</th><th>reason</th></tr>" +
                    "".join(f"<tr><td>{e(str(i))}</td><td>{e(_show(v))}</td><td>{e(str(why))}</td></tr>"
                            for i, v, why in items) + "</table>" +
                    (f"<p>... and {more} more (the validation page below lists them)</p>" if more > 0 else ""))
    if failing:
        failing = "<h2>Failing rows</h2>" + failing
    pages = sorted(p.relative_to(docs_dir).as_posix() for p in docs_dir.glob("validations/**/*.html")) + \
        sorted(p.relative_to(docs_dir).as_posix() for p in docs_dir.glob("expectations/*.html"))
    links = "".join(f"<li><a href='{html.escape(p)}'>{html.escape(p)}</a></li>" for p in pages)
    verdict = "passed" if success else f"failed ({sum(1 for n in counts.values() if n)} expectation(s) with failing rows)"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(suite_name)}: data docs</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}tr.bad td{{background:#fde8e8}}
tr.ok td:nth-child(2){{color:#2a7a2a}}</style></head><body>
<h1>{html.escape(suite_name)}: {html.escape(verdict)}</h1>
<table><tr><th>expectation</th><th>failing rows</th><th>bounds</th></tr>{rows}</table>
{failing}
<h2>Pages</h2><ul>{links}<li><a href="gx_index.html">gx_index.html</a> (great-expectations' own index; its
list and styling need internet)</li></ul></body></html>
"""
    out = docs_dir / "index.html"
    out.write_text(page, encoding="utf-8")
    return out


def _show(value: Any) -> str:
    """A cell value as text: floats to 4 significant digits, missing as ``null``."""
    if not _present(value):
        return "null"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _present(value: Any) -> bool:
    """True for a real value; False for None/NaN (pandas 3 stores missing strings as NaN)."""
    return value is not None and not (isinstance(value, float) and value != value)


def ingest_checks(cfg: Any) -> list[Check]:
    """The ingest suite: one expectation per rule of the manifest."""
    lo, hi = cfg.alpha_coverage_min, cfg.alpha_coverage_max
    return [
        Check(("ExpectColumnValuesToBeNull", {"column": "read_error"}), lambda r: r["read_error"], after_read_error=True),
        Check(("ExpectColumnValuesToBeBetween", {"column": "n_views", "min_value": cfg.min_views}),
              lambda r: f"only {r['n_views']} views (at least {cfg.min_views} needed)"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "n_image_sizes", "min_value": 1, "max_value": 1}),
              lambda r: f"views have {r['n_image_sizes']} different image sizes (all must be equal)"),
        Check(("ExpectColumnValuesToBeInSet", {"column": "poses_finite", "value_set": [True]}),
              lambda r: "a camera pose contains NaN or inf"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "max_rotation_error", "max_value": cfg.rotation_tol}),
              lambda r: f"a camera rotation is not orthonormal (error {r['max_rotation_error']:.3g} > {cfg.rotation_tol:g})"),
        Check(("ExpectColumnValuesToBeInSet", {"column": "has_alpha", "value_set": [True]}),
              lambda r: "images have no alpha channel (RGBA with a transparent background is required)"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "alpha_coverage", "min_value": lo, "max_value": hi}),
              lambda r: f"alpha coverage {r['alpha_coverage']:.4f} outside [{lo:g}, {hi:g}]"),
        Check(("ExpectColumnValuesToNotBeNull", {"column": "caption"}),
              lambda r: "no caption for this id", after_read_error=True),
        Check(("ExpectColumnValueLengthsToBeBetween", {"column": "caption", "min_value": 1}),
              lambda r: "empty caption", after_read_error=True),
        Check(("ExpectColumnValuesToBeBetween", {"column": "id_occurrence", "min_value": 1, "max_value": 1}),
              lambda r: f"duplicate id {r['id']!r}: already taken from {r['duplicate_of']}", after_read_error=True),
    ]


def validate_ingest_facts(facts: pd.DataFrame, cfg: Any, docs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the ingest suite (``ingest_manifest``) over the per-object facts table."""
    return run_suite(facts, "ingest_manifest", ingest_checks(cfg), docs_dir=docs_dir)


def prune_checks(cfg: Any) -> list[Check]:
    """The prune_check suite over the fit metrics table (``params.yaml: prune_check``)."""
    import math

    lo, hi = math.log(cfg.min_scale), math.log(cfg.max_scale)
    return [
        Check(("ExpectColumnValuesToBeInSet", {"column": "status", "value_set": ["ok"]}),
              lambda r: r["reason"] or f"fit status {r['status']}", after_read_error=True),
        Check(("ExpectColumnValuesToBeBetween", {"column": "n_gaussians", "min_value": 1, "max_value": cfg.tau}),
              lambda r: f"{r['n_gaussians']:.0f} Gaussians (allowed 1..{cfg.tau})"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "n_nonfinite", "max_value": 0}),
              lambda r: f"{r['n_nonfinite']:.0f} Gaussians with NaN/inf parameters"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "psnr", "min_value": cfg.psnr_floor}),
              lambda r: f"held-out PSNR {r['psnr']:.2f} dB below the floor {cfg.psnr_floor:g} dB"),
        # the floor above skips missing values (great-expectations ignores nulls): a NaN PSNR must fail on its own
        Check(("ExpectColumnValuesToNotBeNull", {"column": "psnr"}),
              lambda r: "held-out PSNR missing (NaN: the held-out render gave no finite value)"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "log_scale_min", "min_value": lo}),
              lambda r: f"degenerate scale {math.exp(r['log_scale_min']):.2g} (< {cfg.min_scale:g})"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "log_scale_max", "max_value": hi}),
              lambda r: f"degenerate scale {math.exp(r['log_scale_max']):.2g} (> {cfg.max_scale:g})"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "frac_transparent", "max_value": cfg.max_transparent_fraction}),
              lambda r: f"{r['frac_transparent']:.0%} of the Gaussians are transparent (opacity < 0.005; "
                        f"allowed {cfg.max_transparent_fraction:.0%})"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "extent", "max_value": cfg.max_extent}),
              lambda r: f"Gaussians reach {r['extent']:.2f} from the centre (allowed {cfg.max_extent:g})"),
    ]


def validate_fits(metrics: pd.DataFrame, cfg: Any, docs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the prune_check suite (``fit_quality``) over the per-object fit metrics.

    Rows with ``status != "ok"`` are treated like ingest's read errors: only their
    own reason is reported.
    """
    frame = metrics.copy()
    frame["read_error"] = frame["status"].where(frame["status"] != "ok")  # failed fits: their reason only
    for col in ("n_gaussians", "n_nonfinite", "psnr", "log_scale_min", "log_scale_max", "frac_transparent",
                "extent", "reason"):
        if col not in frame:
            frame[col] = float("nan") if col != "reason" else ""
    frame.insert(0, ROW, range(len(frame)))
    return run_suite(frame, "fit_quality", prune_checks(cfg), docs_dir=docs_dir)


def validate_stats(stats: Any, min_atlases: int, docs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check normalisation statistics with the ``atlas_stats`` suite, one row per channel.

    Every channel needs finite means and finite, strictly positive stds (the
    floor guarantees > 0 where the data does not vary), and the statistics must
    come from at least ``min_atlases`` atlases.
    """
    import numpy as np

    mean, std = np.asarray(stats.mean), np.asarray(stats.std)
    frame = pd.DataFrame({
        ROW: range(mean.shape[0]),
        "channel": range(mean.shape[0]),
        "mean_nonfinite": [int((~np.isfinite(m)).sum()) for m in mean],
        "std_nonfinite": [int((~np.isfinite(s)).sum()) for s in std],
        "std_min": [float(np.nan_to_num(s, nan=-1.0).min()) for s in std],
        "count": [int(stats.count)] * mean.shape[0],
    })
    checks = [
        Check(("ExpectColumnValuesToBeBetween", {"column": "mean_nonfinite", "max_value": 0}),
              lambda r: f"channel {r['channel']}: {r['mean_nonfinite']} non-finite means"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "std_nonfinite", "max_value": 0}),
              lambda r: f"channel {r['channel']}: {r['std_nonfinite']} non-finite stds"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "std_min", "min_value": stats.std_floor}),
              lambda r: f"channel {r['channel']}: std {r['std_min']:.3g} below the floor {stats.std_floor:g}"),
        Check(("ExpectColumnValuesToBeBetween", {"column": "count", "min_value": min_atlases}),
              lambda r: f"statistics of only {r['count']} atlases (at least {min_atlases} needed)"),
    ]
    return run_suite(frame, "atlas_stats", checks, docs_dir=docs_dir)
