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
    from stages.fanout import fan_out

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
    from stages.fanout import make_task_runner

    with pytest.raises(ValueError, match="unknown runner"):
        make_task_runner("slurm", 1)


def test_changed_views_are_reingested_and_refit_a_touched_file_is_not(tmp_path):
    """The reuse keys follow content: a re-rendered source image makes ingest rewrite that object and fit
    redo it; the other objects (and a file whose time stamp alone changed) are reused."""
    import os
    import shutil

    from PIL import Image

    from gaussian_atlas.data import IngestConfig, ingest

    root = make_ingested(tmp_path, n_objects=2)
    items = load_manifest(root / "ing")[["id", "path", "shard"]].to_dict("records")
    out = tmp_path / "fits"
    first = {r["id"]: r for r in fit_chunk(items, str(root / "ing"), str(out), CFG, device="cpu")}
    a, b = sorted(first)
    # a changed view of object a (another file, as a re-render writes it), and only a new time stamp for b
    img = root / "raw" / "objects" / a / "images" / "r_000.png"
    arr = __import__("numpy").asarray(Image.open(img)).copy()
    arr[..., :3] = 255 - arr[..., :3]
    tmp = img.with_suffix(".new.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, img)
    other = root / "raw" / "objects" / b / "images" / "r_001.png"
    os.utime(other, (1e9, 1e9))
    ingest(IngestConfig(source=str(root / "raw"), captions=str(root / "raw" / "captions.jsonl"), min_views=4),
           root / "ing", progress=False)
    ing_img = next((root / "ing" / "objects").rglob(f"{a}/images/r_000.png"))
    assert (__import__("numpy").asarray(Image.open(ing_img))[..., :3] == arr[..., :3]).all()  # not the stale view
    again = {r["id"]: r for r in fit_chunk(items, str(root / "ing"), str(out), CFG, device="cpu")}
    assert again[a]["input_stamp"] != first[a]["input_stamp"] and again[a]["seconds"] != first[a]["seconds"]
    assert first[a]["fitted_now"] and first[b]["fitted_now"] and again[a]["fitted_now"] and not again[b]["fitted_now"]
    assert {**again[b], "fitted_now": True} == first[b]  # reused as it was
    shutil.rmtree(root)
