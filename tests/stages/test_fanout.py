"""Per-object work fanned out to Prefect task runners: threads and a local Dask cluster."""

from __future__ import annotations

import pytest

from gaussian_atlas.data import load_manifest
from gaussian_atlas.fit import DensifyConfig, FitConfig, fit_chunk, is_done
from tests.conftest import make_ingested

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    return make_ingested(tmp_path_factory.mktemp("fan"), n_objects=3)


CFG = FitConfig(steps=8, tau=150, init_points=100, views_per_step=2, holdout_every=4, measure_views=2,
                densify=DensifyConfig(refine_start_iter=100))


def _chunks(root, out):
    items = load_manifest(root / "ing")[["id", "path", "shard"]].to_dict("records")
    return items, [(f"chunk {i}", (items[i:i + 2], str(root / "ing"), str(out), CFG), {"device": "cpu"})
                   for i in range(0, len(items), 2)]


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_fan_out_fits_every_object_once(ingested, tmp_path, runner, prefect_harness):
    from flows.fanout import fan_out

    out = tmp_path / "fits"
    items, chunks = _chunks(ingested, out)
    rows = fan_out(fit_chunk, chunks, runner=runner, workers=2)
    assert sorted(r["id"] for r in rows) == sorted(i["id"] for i in items)
    assert all(r["status"] == "ok" and r["n_gaussians"] <= CFG.tau for r in rows)
    assert all(is_done(out, i["shard"], i["id"], CFG) for i in items)
    # a second run finds everything done and fits nothing again
    again = fit_chunk(items, str(ingested / "ing"), str(out), CFG, device="cpu")
    assert [r["seconds"] for r in sorted(again, key=lambda r: r["id"])] == \
           [r["seconds"] for r in sorted(rows, key=lambda r: r["id"])]


def test_unreadable_object_fails_alone(ingested, tmp_path):
    items, _ = _chunks(ingested, tmp_path)
    broken = dict(items[0], path="objects/nowhere/missing")
    rows = fit_chunk([broken] + items[1:], str(ingested / "ing"), str(tmp_path / "fits"), CFG, device="cpu")
    by_id = {r["id"]: r for r in rows}
    assert by_id[broken["id"]]["status"] == "failed" and "cannot load" in by_id[broken["id"]]["reason"]
    assert all(by_id[i["id"]]["status"] == "ok" for i in items[1:])


def test_unknown_runner_is_refused():
    from flows.fanout import make_task_runner

    with pytest.raises(ValueError, match="unknown runner"):
        make_task_runner("slurm", 1)
