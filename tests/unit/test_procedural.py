"""The built-in procedural dataset: specs, meshes, and the resumable generator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from gaussian_atlas.cameras import ViewConfig
from gaussian_atlas.meshrender import RenderConfig, object_folder_complete
from gaussian_atlas.procedural import (
    COLORS,
    SHAPES,
    STACK_BOTTOM_SHAPES,
    ProceduralConfig,
    build_object,
    generate_dataset,
    make_primitive,
    object_specs,
)

TINY = RenderConfig(views=ViewConfig(n_views=3, n_ring=2, resolution=24), n_surface_samples=64)


@pytest.mark.parametrize("shape", SHAPES)
def test_primitives_are_watertight_solids(shape):
    m = make_primitive(shape)
    assert m.is_watertight and m.is_winding_consistent
    assert m.volume > 0.1  # outward-facing winding
    assert 0.5 < np.ptp(m.bounds, axis=0).max() < 1.6  # roughly unit size


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="blob"):
        make_primitive("blob")


def test_required_shapes_and_colours_exist():
    assert {"cube", "sphere", "cylinder", "cone", "torus", "capsule", "pyramid"} <= set(SHAPES)
    required = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "brown", "gray", "black", "white"}
    assert required <= set(COLORS)
    assert len(set(COLORS.values())) == len(COLORS)
    # the named hue is the dominant channel where it has one
    for name, channel in [("red", 0), ("green", 1), ("blue", 2)]:
        assert np.argmax(COLORS[name]) == channel


def test_object_specs_are_deterministic_and_cover_every_shape():
    cfg = ProceduralConfig(n_objects=40, composition_fraction=0.25, seed=5)
    specs = object_specs(cfg)
    assert specs == object_specs(cfg)
    assert specs != object_specs(ProceduralConfig(n_objects=40, composition_fraction=0.25, seed=6))
    assert [s["id"] for s in specs] == [f"proc-{i:05d}" for i in range(40)]
    assert len({s["seed"] for s in specs}) == 40
    singles = [s for s in specs if len(s["parts"]) == 1]
    stacks = [s for s in specs if len(s["parts"]) == 2]
    assert len(stacks) == 10
    # any len(SHAPES) consecutive singles cover every shape
    first = [s["parts"][0]["shape"] for s in singles[: len(SHAPES)]]
    assert sorted(first) == sorted(SHAPES)
    for s in singles:
        p = s["parts"][0]
        assert re.fullmatch(r"an? [a-z]+ [a-z ]+", s["caption"])
        assert p["color"] in s["caption"] and tuple(p["rgb"]) == COLORS[p["color"]]
    for s in stacks:
        top, bottom = s["parts"]
        assert top["color"] != bottom["color"] and bottom["shape"] in STACK_BOTTOM_SHAPES
        assert s["caption"] == (
            f"{'an' if top['color'][0] in 'aeiou' else 'a'} {top['color']} {_noun(top)} on top of "
            f"{'an' if bottom['color'][0] in 'aeiou' else 'a'} {bottom['color']} {_noun(bottom)}"
        )
    # a small set still covers every shape
    small = object_specs(ProceduralConfig(n_objects=12, seed=0))
    assert {s["parts"][0]["shape"] for s in small if len(s["parts"]) == 1} == set(SHAPES)


def _noun(part):
    from gaussian_atlas.procedural import SHAPE_NOUNS

    return SHAPE_NOUNS[part["shape"]]


def test_stacked_parts_rest_on_each_other():
    cfg = ProceduralConfig(n_objects=8, composition_fraction=1.0, seed=2)
    for spec in object_specs(cfg):
        mesh = build_object(spec)
        top_rgb, bottom_rgb = (np.array(p["rgb"]) for p in spec["parts"])
        fc = mesh.visual.face_colors[:, :3]
        is_top = np.all(fc == top_rgb, axis=1)
        is_bottom = np.all(fc == bottom_rgb, axis=1)
        assert is_top.any() and is_bottom.any() and np.all(is_top | is_bottom)
        z_top = mesh.vertices[mesh.faces[is_top]].reshape(-1, 3)[:, 2]
        z_bottom = mesh.vertices[mesh.faces[is_bottom]].reshape(-1, 3)[:, 2]
        assert z_top.min() == pytest.approx(z_bottom.max(), abs=1e-9)  # touching, not overlapping
        # centred on each other in XY
        c_top = mesh.vertices[mesh.faces[is_top]].reshape(-1, 3)[:, :2]
        c_bottom = mesh.vertices[mesh.faces[is_bottom]].reshape(-1, 3)[:, :2]
        np.testing.assert_allclose((c_top.min(0) + c_top.max(0)) / 2, (c_bottom.min(0) + c_bottom.max(0)) / 2, atol=1e-9)
        # same spec, same mesh
        np.testing.assert_array_equal(build_object(spec).vertices, mesh.vertices)


def test_variation_is_seeded_and_bounded():
    spec = {"parts": [{"shape": "cube", "color": "red", "rgb": [210, 30, 30]}], "seed": 1}
    a, b = build_object(spec), build_object({**spec, "seed": 2})
    assert not np.allclose(a.vertices, b.vertices)
    # anisotropic scale within +-20 %: the cube's edge lengths stay in [0.8, 1.2]
    for m in (a, b):
        edges = np.linalg.norm(m.vertices[m.edges_unique[:, 0]] - m.vertices[m.edges_unique[:, 1]], axis=1)
        axis_edges = edges[edges < 1.25]  # drop face diagonals
        assert axis_edges.min() >= 0.8 - 1e-9 and axis_edges.max() <= 1.2 + 1e-9


def test_config_accepts_a_params_section():
    cfg = ProceduralConfig(render={"views": {"resolution": 32, "n_views": 4, "n_ring": 2}, "lights": [[[0, 0, 1], 0.5]]})
    assert cfg.render.views.resolution == 32 and cfg.render.lights == (((0.0, 0.0, 1.0), 0.5),)
    hash(cfg)  # still a frozen, hashable config
    with pytest.raises(ValueError):
        ProceduralConfig(composition_fraction=1.5)


def _files(root):
    return {p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_dataset_layout_and_resume(tmp_path):
    cfg = ProceduralConfig(n_objects=3, composition_fraction=0.34, seed=1, render=TINY, workers=0)
    summary = generate_dataset(cfg, tmp_path, progress=False)
    assert summary["n_rendered"] == 3 and summary["n_skipped"] == 0
    specs = object_specs(cfg)
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert lines == [{"id": s["id"], "caption": s["caption"], "split": s["split"]} for s in specs]
    assert sum(len(s["parts"]) == 2 for s in specs) == 1
    for spec in specs:
        d = tmp_path / "objects" / spec["id"]
        assert object_folder_complete(d)
        tf = json.loads((d / "transforms.json").read_text())
        assert len(tf["frames"]) == 3 and tf["w"] == tf["h"] == 24
        meta = json.loads((d / "object.json").read_text())
        assert meta["caption"] == spec["caption"] and meta["parts"] == spec["parts"] and meta["seed"] == spec["seed"]
        for frame in tf["frames"]:
            img = np.asarray(Image.open(d / frame["file_path"]))
            a = img[..., 3]
            assert a.max() == 255 and np.all(img[..., :3][a == 0] == 255)
            # fully in frame: nothing touches the border
            assert a[0].max() == a[-1].max() == a[:, 0].max() == a[:, -1].max() == 0
    assert not list(tmp_path.glob("objects/.*"))  # no temporary folders left

    before = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in _files(tmp_path / "objects").items()}
    again = generate_dataset(cfg, tmp_path, progress=False)
    assert again["n_rendered"] == 0 and again["n_skipped"] == 3
    after = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in _files(tmp_path / "objects").items()}
    assert after == before  # nothing re-rendered

    # an incomplete folder (a missing image) is rendered again, identically; the others are left alone
    victim = tmp_path / "objects" / specs[1]["id"] / "images" / "r_001.png"
    victim.unlink()
    third = generate_dataset(cfg, tmp_path, progress=False)
    assert third["n_rendered"] == 1
    after = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in _files(tmp_path / "objects").items()}
    assert set(after) == set(before)
    for k in before:
        assert after[k][1] == before[k][1]  # same bytes: deterministic per object
        if not str(k).startswith(specs[1]["id"]):
            assert after[k][0] == before[k][0]


def test_output_does_not_depend_on_worker_count(tmp_path):
    base = dict(n_objects=2, composition_fraction=0.5, seed=4, render=TINY)
    generate_dataset(ProceduralConfig(**base, workers=0), tmp_path / "serial", progress=False)
    generate_dataset(ProceduralConfig(**base, workers=2), tmp_path / "pool", progress=False)
    serial, pool = _files(tmp_path / "serial"), _files(tmp_path / "pool")
    assert set(serial) == set(pool) and len(serial) > 5
    for k in serial:
        assert serial[k].read_bytes() == pool[k].read_bytes(), k


def test_param_change_rerenders_and_fewer_objects_drops_folders(tmp_path):
    cfg = ProceduralConfig(n_objects=3, composition_fraction=0.0, seed=1, render=TINY, workers=0)
    generate_dataset(cfg, tmp_path, progress=False)
    first = tmp_path / "objects" / "proc-00000" / "transforms.json"
    mtime = first.stat().st_mtime_ns
    # same params: nothing re-rendered
    assert generate_dataset(cfg, tmp_path, progress=False)["n_rendered"] == 0
    # fewer objects: the extra folder disappears, the rest is kept as is
    smaller = ProceduralConfig(n_objects=2, composition_fraction=0.0, seed=1, render=TINY, workers=0)
    assert generate_dataset(smaller, tmp_path, progress=False)["n_rendered"] == 0
    assert sorted(p.name for p in (tmp_path / "objects").iterdir()) == ["proc-00000", "proc-00001"]
    assert first.stat().st_mtime_ns == mtime
    # a render setting changes: everything is re-rendered, nothing stale is kept
    import dataclasses
    brighter = dataclasses.replace(smaller, render=dataclasses.replace(TINY, ambient=TINY.ambient + 0.1))
    assert generate_dataset(brighter, tmp_path, progress=False)["n_rendered"] == 2


def test_holdout_never_leaks_into_training_objects():
    """Held-out pairs occur in no training object (alone or as a part), held-out stacks in no training
    caption; each held-out prompt gets its ceiling objects; the held-out singles cover every colour."""
    from gaussian_atlas.evaluate import parse_caption
    from gaussian_atlas.procedural import HoldoutConfig, holdout_sets

    cfg = ProceduralConfig(n_objects=300, seed=3, holdout=HoldoutConfig(singles=12, compositions=4, ceiling_per_prompt=2))
    singles, stacks = holdout_sets(cfg)
    assert len(set(singles)) == 12 and len(set(stacks)) == 4
    assert {c for _, c in singles} == set(COLORS)  # spread: every colour once
    assert max(sum(s == sh for s, _ in singles) for sh in SHAPES) <= 2
    specs = object_specs(cfg)
    train = [s for s in specs if s["split"] == "train"]
    ceiling = [s for s in specs if s["split"] == "ceiling"]
    assert len(train) == 300 and len(ceiling) == 2 * 16
    train_parts = {(p["shape"], p["color"]) for s in train for p in s["parts"]}
    assert not train_parts & set(singles)
    stack_caps = {tuple((p["shape"], p["color"]) for p in s["parts"]) for s in train if len(s["parts"]) == 2}
    assert not stack_caps & set(stacks)
    for s in ceiling:  # the ceiling objects are exactly the held-out prompts
        parts = parse_caption(s["caption"])
        assert (len(parts) == 1 and parts[0] in singles) or parts in stacks
    assert len({s["id"] for s in specs}) == len(specs)
    # without a holdout the training objects are the same as before the split existed
    plain = object_specs(ProceduralConfig(n_objects=40, seed=3))
    assert all(s["split"] == "train" for s in plain)
    assert [s["caption"] for s in plain] == [s["caption"] for s in object_specs(
        ProceduralConfig(n_objects=40, seed=3, holdout=HoldoutConfig(singles=0, compositions=0)))]
