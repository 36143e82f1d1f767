"""Ingest: both layouts read, every bad input quarantined with its reason, nothing else lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gaussian_atlas.data import (DatasetError, IngestConfig, discover_objects, ingest, load_object,
                                 read_captions)
from tests.conftest import make_gobjaverse_object, make_nerf_object, write_captions


def _cfg(root, caps, **kw):
    return IngestConfig(source=str(root), captions=str(caps) if caps else None, min_views=4,
                        alpha_coverage_min=0.01, alpha_coverage_max=0.9, workers=2, **kw)


def _frame(path: Path, i: int) -> tuple[dict, dict]:
    meta = json.loads(path.read_text())
    return meta, meta["frames"][i]


def test_good_dataset_all_accepted_and_layout_written(nerf_dataset, tmp_path):
    root, caps, ids = nerf_dataset
    out = tmp_path / "out"
    summary = ingest(_cfg(root, caps), out, docs_dir=tmp_path / "docs", progress=False)
    assert summary["n_accepted"] == 5 and summary["n_quarantined"] == 0
    man = pd.read_parquet(out / "manifest.parquet")
    assert sorted(man["id"]) == ids
    assert (man["n_views"] == 8).all() and (man["width"] == 16).all()
    assert man["alpha_coverage"].between(0.2, 0.4).all()  # disc of radius 0.3 -> pi*0.09 = 0.283
    obj = load_object(out / man["path"][0])
    assert obj["rgb"].shape == (8, 16, 16, 3) and obj["c2w"].shape == (8, 4, 4)
    assert np.allclose(obj["K"][:, 0, 2], 8.0)  # principal point at the image centre
    assert (tmp_path / "docs" / "index.html").exists()
    assert summary["gx_success"] is True


def test_gobjaverse_cameras_converted_to_opengl(tmp_path):
    root = tmp_path / "gobj"
    for i in range(3):
        make_gobjaverse_object(root, f"g{i}", group=str(i % 2))
    caps = write_captions(tmp_path / "c.jsonl", {f"g{i}": "a thing" for i in range(3)})
    out = tmp_path / "out"
    summary = ingest(_cfg(root, caps), out, progress=False)
    assert summary["n_accepted"] == 3
    man = pd.read_parquet(out / "manifest.parquet")
    obj = load_object(out / man["path"][0])
    # OpenGL convention: the camera looks down its -Z axis, towards the object at the origin.
    for c2w in obj["c2w"]:
        look = -c2w[:3, 2]
        to_origin = -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3])
        assert np.dot(look, to_origin) > 0.999
    fov = man["fov_x_deg"][0]
    assert abs(fov - np.degrees(0.6911112070083618)) < 1e-6


def test_split_transforms_merged(tmp_path):
    root = tmp_path / "r"
    make_nerf_object(root, "a", n_views=8, split=True)
    caps = write_captions(tmp_path / "c.jsonl", {"a": "x"})
    summary = ingest(_cfg(root, caps), tmp_path / "out", progress=False)
    assert summary["n_accepted"] == 1
    assert pd.read_parquet(tmp_path / "out" / "manifest.parquet")["n_views"][0] == 8


def _break(kind: str, d: Path) -> None:
    t = d / "transforms.json"
    if kind == "corrupt_png":
        (d / "images" / "r_003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif kind == "truncated_png":
        data = (d / "images" / "r_002.png").read_bytes()
        (d / "images" / "r_002.png").write_bytes(data[: len(data) // 2])
    elif kind == "missing_view":
        (d / "images" / "r_005.png").unlink()
    elif kind in ("nan_pose", "not_orthonormal"):
        meta, fr = _frame(t, 1)
        m = np.asarray(fr["transform_matrix"])
        if kind == "nan_pose":
            m[0, 3] = np.nan
        else:
            m[:3, 0] *= 1.5
        meta["frames"][1]["transform_matrix"] = m.tolist()
        t.write_text(json.dumps(meta).replace("NaN", "NaN"))
    elif kind == "size_mismatch":
        from PIL import Image
        Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(d / "images" / "r_004.png")
    elif kind == "bad_json":
        t.write_text("{not json")
    elif kind == "no_alpha":
        from PIL import Image
        for p in (d / "images").glob("*.png"):
            Image.open(p).convert("RGB").save(p)
    elif kind == "empty_render":
        from PIL import Image
        for p in (d / "images").glob("*.png"):
            Image.new("RGBA", (16, 16), (255, 255, 255, 0)).save(p)
    else:
        raise AssertionError(kind)


BAD = {
    "corrupt_png": "cannot decode image r_003.png",
    "truncated_png": "cannot decode image r_002.png",
    "missing_view": "image file r_005.png is missing",
    "nan_pose": "NaN or inf",
    "not_orthonormal": "not orthonormal",
    "size_mismatch": "different image sizes",
    "bad_json": "not valid JSON",
    "no_alpha": "no alpha channel",
    "empty_render": "alpha coverage 0.0000",
}


def test_each_bad_object_quarantined_with_reason_rest_kept(tmp_path):
    root = tmp_path / "r"
    good = [f"good{i}" for i in range(3)]
    for i in good:
        make_nerf_object(root, i)
    for kind in BAD:
        _break(kind, make_nerf_object(root, f"bad_{kind}"))
    make_nerf_object(root, "no_caption")
    make_nerf_object(root, "empty_caption")
    make_nerf_object(root, "few_views", n_views=2)
    caps = {i: "a red disc" for i in good + [f"bad_{k}" for k in BAD] + ["few_views"]}
    caps["empty_caption"] = "   "
    caps_path = write_captions(tmp_path / "c.jsonl", caps)
    out = tmp_path / "out"
    summary = ingest(_cfg(root, caps_path), out, progress=False)

    q = pd.read_csv(out / "quarantine.csv").set_index("id")["reason"].to_dict()
    for kind, needle in BAD.items():
        assert needle in q[f"bad_{kind}"], (kind, q[f"bad_{kind}"])
    assert q["no_caption"] == "no caption for this id"
    assert q["empty_caption"] == "empty caption"
    assert "only 2 views" in q["few_views"]
    man = pd.read_parquet(out / "manifest.parquet")
    assert sorted(man["id"]) == good  # nothing good is lost
    assert summary["n_found"] == len(good) + len(BAD) + 3
    assert summary["quarantined_fraction"] == pytest.approx((len(BAD) + 3) / summary["n_found"])
    assert summary["gx_success"] is False


def test_duplicate_id_keeps_first_quarantines_later(tmp_path):
    root = tmp_path / "r"
    make_nerf_object(root / "part1", "same")
    make_nerf_object(root / "part2", "same")
    make_nerf_object(root / "part2", "other")
    caps = write_captions(tmp_path / "c.jsonl", {"same": "x", "other": "y"})
    out = tmp_path / "out"
    ingest(_cfg(root, caps), out, progress=False)
    man = pd.read_parquet(out / "manifest.parquet")
    assert sorted(man["id"]) == ["other", "same"]
    assert "part1" in man.set_index("id").loc["same", "source_path"]
    q = pd.read_csv(out / "quarantine.csv")
    assert list(q["id"]) == ["same"] and "duplicate id" in q["reason"][0] and "part1" in q["reason"][0]


def test_conflicting_caption_rows_quarantine_that_id(tmp_path):
    root = tmp_path / "r"
    make_nerf_object(root, "a")
    make_nerf_object(root, "b")
    p = tmp_path / "c.csv"
    p.write_text("id,caption\na,one\na,two\nb,fine\n")
    caps, bad = read_captions(p)
    assert caps == {"a": "one", "b": "fine"} and "two different captions" in bad["a"]
    out = tmp_path / "out"
    ingest(_cfg(root, p), out, progress=False)
    assert list(pd.read_parquet(out / "manifest.parquet")["id"]) == ["b"]


def test_wrong_path_and_empty_dataset_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover_objects(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no objects found"):
        ingest(_cfg(tmp_path / "empty", None), tmp_path / "out", progress=False)


def test_rerun_keeps_finished_objects_and_drops_stale(nerf_dataset, tmp_path):
    root, caps, ids = nerf_dataset
    out = tmp_path / "out"
    ingest(_cfg(root, caps), out, progress=False)
    man = pd.read_parquet(out / "manifest.parquet")
    first = out / man["path"][0] / "transforms.json"
    mtime = first.stat().st_mtime_ns
    # an object disappears from the source -> its folder disappears from the output
    import shutil
    shutil.rmtree(root / ids[-1])
    ingest(_cfg(root, caps), out, progress=False)
    assert first.stat().st_mtime_ns == mtime  # untouched, not rewritten
    man2 = pd.read_parquet(out / "manifest.parquet")
    assert ids[-1] not in set(man2["id"])
    assert not any(p.name == ids[-1] for p in (out / "objects").glob("*/*"))
