"""The evaluation metrics: prompt parsing, colour and shape scoring, floor near chance, CLIP from a local folder, skips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gaussian_atlas.evaluate import (CHANCE, EvaluateConfig, PromptSpec, benchmark_prompts, classify_shape,
                                     evaluate, gallery_html, load_clip, load_vqa, object_palettes, parse_caption,
                                     random_atlases,
                                     random_views, read_prompts, rendered_palette, score_objects, skipped, slug,
                                     summarise, surface_points)
from gaussian_atlas.gaussians import Gaussians
from gaussian_atlas.procedural import COLORS, SHAPES, ProceduralConfig, build_object, object_specs
from gaussian_atlas.sample import SampleConfig

RES, V = 32, 3


def _views(B: int, seed: int = 0):
    cams = [random_views(V, RES, seed + i) for i in range(B)]
    return torch.stack([c for c, _ in cams]), torch.stack([k for _, k in cams])


def _object(parts, seed=0) -> Gaussians:
    """A generator object (random stretch and turn) as Gaussians on its surface, each part lit in its colour."""
    import trimesh

    spec = {"seed": seed, "parts": [{"shape": s, "rgb": list(COLORS[c])} for s, c in parts]}
    mesh = build_object(spec)
    n = 1500
    pts, face = trimesh.sample.sample_surface(mesh, n, seed=seed)
    albedo = mesh.visual.face_colors[face, :3] / 255.0
    from gaussian_atlas.meshrender import RenderConfig

    rc = RenderConfig()
    light = np.full(n, rc.ambient)
    for d, i in rc.lights:
        light += i * np.clip(mesh.face_normals[face] @ (np.asarray(d) / np.linalg.norm(d)), 0, None)
    pts = pts - 0.5 * (pts.min(0) + pts.max(0))
    pts = pts / np.linalg.norm(pts, axis=1).max()
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return Gaussians.from_activated(means=t(pts), quats=t([[1.0, 0, 0, 0]] * n), scales=torch.full((n, 3), 0.03),
                                    opacities=torch.full((n,), 0.95), rgb=t(np.clip(albedo * light[:, None], 0, 1)))


# --------------------------------------------------------------------------- prompts


def test_parse_caption_inverts_every_generator_caption():
    for s in object_specs(ProceduralConfig(n_objects=60, composition_fraction=0.3)):
        assert parse_caption(s["caption"]) == tuple((p["shape"], p["color"]) for p in s["parts"])
    assert parse_caption("  An ORANGE triangular   prism ") == (("prism", "orange"),)
    for free in ("a dog", "a red dog", "a red cube next to a blue cone", "red cube", ""):
        assert parse_caption(free) is None


def test_benchmark_prompts_hold_out_unseen_combinations():
    captions = [s["caption"] for s in object_specs(ProceduralConfig(n_objects=48))]
    specs = benchmark_prompts(captions, n_seen=6, n_held_out=5, n_compositions=3, seed=1)
    assert specs == benchmark_prompts(captions, n_seen=6, n_held_out=5, n_compositions=3, seed=1)  # deterministic
    seen_parts = {p for c in captions for p in parse_caption(c)}
    kinds = [(s.kind, s.held_out) for s in specs]
    assert kinds.count(("single", False)) == 6 and kinds.count(("single", True)) == 5
    assert sum(1 for s in specs if s.kind == "composition") == 3
    for s in specs:
        assert parse_caption(s.prompt) == s.parts
        if s.kind == "single" and s.held_out:
            assert s.parts[0] not in seen_parts  # never seen, alone or as a part
        if not s.held_out:
            assert s.prompt in captions
    seen_singles = [s.parts[0][0] for s in specs if s.kind == "single" and not s.held_out]
    assert len(set(seen_singles)) == 6  # spread over shapes
    # when every combination was seen there is nothing to hold out: fewer prompts, no made-up ones
    everything = [f"a {c} {s}" for s in ("cube", "cone") for c in COLORS]
    assert not [s for s in benchmark_prompts(everything, 0, 4, 0) if s.held_out]


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\na red cube\n\na dog on a skateboard\na blue cube on top of a red cylinder\n")
    specs = read_prompts(f, ["a red cube", "a green cone"])
    assert [s.kind for s in specs] == ["single", "free", "composition"]
    assert [s.held_out for s in specs] == [False, True, True]
    with pytest.raises(FileNotFoundError, match="prompts file does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_config_from_params_section():
    from gaussian_atlas.config import from_dict

    cfg = from_dict(EvaluateConfig, {"n_views": 4, "sample": {"steps": 10, "frames": 8}}, "evaluate")
    assert cfg.sample == SampleConfig(steps=10, frames=8) and cfg.n_views == 4
    with pytest.raises(ValueError, match=r"evaluate.sample: unknown key\(s\) \['step'\]"):
        from_dict(EvaluateConfig, {"sample": {"step": 10}}, "evaluate")


# --------------------------------------------------------------------------- colour and shape


def test_colour_scoring_right_colour_correct_other_colour_wrong():
    names = list(COLORS)
    c2w, K = _views(len(names))
    palette = rendered_palette(c2w.reshape(-1, 4, 4))
    g = Gaussians.stack([_object([("sphere", c)], seed=i) for i, c in enumerate(names)])
    right = [PromptSpec(f"a {c} sphere", (("sphere", c),), False, "single") for c in names]
    rows = score_objects(g, right, c2w, K, RES, palette, EvaluateConfig(rotations=4, shape_points=256))
    assert [r["colour_pred"] for r in rows] == names
    assert all(r["colour_correct"] for r in rows)
    wrong = [PromptSpec("x", (("sphere", names[(i + 1) % len(names)]),), False, "single") for i in range(len(names))]
    rows_w = score_objects(g, wrong, c2w, K, RES, palette, EvaluateConfig(rotations=4, shape_points=256))
    assert not any(r["colour_correct"] for r in rows_w)
    assert all(w["colour_distance"] > r["colour_distance"] for r, w in zip(rows, rows_w))


def test_object_palette_of_a_sphere_matches_the_analytic_sphere_palette():
    """Two routes to "colour c as the renderer shows it": ray casting the prompted object vs the sphere average."""
    c2w, K = random_views(4, 48, seed=2)
    (ray_cast,) = object_palettes(["sphere"], c2w, K, 48)
    analytic = rendered_palette(c2w)
    for name in COLORS:
        assert np.abs(ray_cast[name] - analytic[name]).max() < 0.03, name
    # an upright prism under another part is seen mostly from the side: darker than its sphere average
    top, bottom = object_palettes(["pyramid", "prism"], c2w, K, 48)
    assert bottom["orange"].sum() < analytic["orange"].sum()


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_scoring_picks_the_primitive_under_the_gaussians(shape):
    g = _object([(shape, "red")], seed=3)
    pred, d = classify_shape(surface_points(g, 1024, seed=0))
    assert pred == shape, sorted(d.items(), key=lambda kv: kv[1])[:3]


def test_batched_classification_equals_the_per_pair_chamfer():
    """classify_shapes (objects x primitives x turns in one batch, sets of different sizes padded) gives the
    distances of chamfer() on each pair, open-bottom candidates included; too few points -> no prediction."""
    from gaussian_atlas.evaluate import candidate_clouds, chamfer, classify_shapes, normalise_points

    gen = torch.Generator().manual_seed(0)
    sets = [surface_points(_object([(shape, "red")], seed=i), 300 + 70 * i, seed=i) for i, shape in
            enumerate(["torus", "cube", "cone", "capsule"])]
    sets += [torch.randn(90, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), None]
    open_bottom = [False, True, False, True, False, False, True]
    out = classify_shapes(sets, open_bottom, rotations=8, n=256, max_elements=2**22)  # several batches
    for pts, ob, (name, d) in zip(sets, open_bottom, out):
        if pts is None or len(pts) < 16:
            assert name is None and all(np.isnan(v) for v in d.values())
            continue
        ref = {k: chamfer(normalise_points(pts), c, 8) for k, c in candidate_clouds(256, 0, ob).items()}
        assert d.keys() == ref.keys()
        assert all(abs(d[k] - ref[k]) < 1e-5 for k in ref), (d, ref)
        assert name == min(ref, key=ref.get)


def test_composition_scores_each_part():
    parts = [("cone", "yellow"), ("cube", "blue")]
    g = Gaussians.stack([_object(parts, seed=5)])
    c2w, K = _views(1)
    spec = PromptSpec("a yellow cone on top of a blue cube", tuple(parts), False, "composition")
    (row,) = score_objects(g, [spec], c2w, K, RES)  # palettes of the prompted object, per part
    assert row["colour_pred"] == "yellow/blue" and row["shape_pred"] == "cone/cube"
    assert row["both_correct"]
    swapped = PromptSpec("a blue cone on top of a yellow cube", (("cone", "blue"), ("cube", "yellow")), False,
                         "composition")
    (row,) = score_objects(g, [swapped], c2w, K, RES)
    assert not row["colour_correct"] and row["shape_correct"]


def test_random_atlases_score_near_chance(tiny_model_dir):
    from gaussian_atlas.atlas import atlas_to_gaussians
    from gaussian_atlas.sample import load_atlas_model

    m = load_atlas_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    names = list(COLORS)
    specs = [PromptSpec("p", ((s, names[int(rng.integers(len(names)))]),), False, "single")
             for s in SHAPES for _ in range(3)]  # 27 prompts, each shape 3 times
    g = atlas_to_gaussians(random_atlases(len(specs), m.mean, m.std, seed=1), None, m.atlas_cfg, grid=m.grid)
    c2w, K = _views(len(specs))
    rows = score_objects(g, specs, c2w, K, 16, rendered_palette(c2w.reshape(-1, 4, 4)),
                         EvaluateConfig(rotations=4, shape_points=256))
    s = summarise(rows, specs)
    assert s["n"] == 27
    assert s["shape_accuracy"] <= 3 * CHANCE["shape"] and s["colour_accuracy"] <= 3 * CHANCE["colour"]
    assert s["both_accuracy"] <= 2 / 27


# --------------------------------------------------------------------------- CLIP / VQA / skips


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from gaussian_atlas.model import build_tokenizer

    tok = build_tokenizer(["a red cube", "a blue cone on top of a green cylinder"], max_length=16)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_from_a_local_folder(tmp_path):
    scorer = load_clip(str(_tiny_clip(tmp_path / "clip")))
    views = np.random.default_rng(0).integers(0, 256, (3, 2, 40, 40, 3), dtype=np.uint8)
    s = scorer(views, ["a red cube", "a blue cone", "a dog"])
    assert s.shape == (3,) and np.all((s >= 0) & (s <= 100))
    assert np.allclose(s, scorer(views, ["a red cube", "a blue cone", "a dog"]))  # deterministic
    # a prompt's score is the mean of its views' scores
    per_view = [scorer(views[:1, k:k + 1], ["a red cube"])[0] for k in range(2)]
    assert s[0] == pytest.approx(np.mean(per_view), abs=1e-4)


def test_skip_reasons_name_the_missing_weights(tmp_path):
    assert load_clip(None) == skipped("no weights configured (evaluate.clip_model is null)")
    assert load_clip(str(tmp_path / "nope")) == skipped(f"no weights at {tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load CLIP from .*empty"):
        load_clip(str(tmp_path / "empty"))
    v = load_vqa(None)
    assert v["status"] == "skipped" and "t2v_metrics" in v["reason"] and "evaluate.vqa_model is null" in v["reason"]
    v = load_vqa(str(tmp_path / "empty"))  # weights folder there, but t2v_metrics cannot be used here
    assert v["status"] == "skipped" and "t2v_metrics" in v["reason"]


# --------------------------------------------------------------------------- end to end on a tiny model


def test_evaluate_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    from gaussian_atlas.sample import load_atlas_model

    m = load_atlas_model(tiny_model_dir)
    specs = benchmark_prompts(["a red cube", "a blue sphere", "a green torus", "a red cone on top of a blue cube"],
                              n_seen=2, n_held_out=1, n_compositions=1)
    specs.append(PromptSpec("a dog", None, True, "free"))
    cfg = EvaluateConfig(n_views=2, resolution=16, rotations=2, shape_points=128, samples_per_prompt=1,
                         clip_model=str(_tiny_clip(tmp_path / "clip")),
                         sample=SampleConfig(steps=2, frames=2, resolution=16))
    ceiling = {0: m.mean.numpy()}
    ev = evaluate(m, specs, cfg, ceiling)
    B = len(specs)
    assert ev.atlases.shape == (B, 16, 8, 8) and ev.gaussians.means.shape == (B, 64, 3)
    assert ev.views["generated"].shape == (B, 2, 16, 16, 3) and ev.views["ceiling"].shape[0] == 1
    assert len(ev.rows) == 2 * B + 1
    mt = ev.metrics
    json.dumps(mt)  # serialisable as is
    for src in ("generated", "ceiling", "floor"):
        assert {"n", "colour_accuracy", "shape_accuracy", "both_accuracy", "colour_distance", "chamfer",
                "seen", "held_out"} <= set(mt[src])
    assert mt["generated"]["n"] == B - 1 and mt["n_free"] == 1 and mt["n_ceiling"] == 1
    assert mt["clip_score"]["status"] == "ok" and 0 <= mt["clip_score"]["generated"] <= 100
    assert mt["vqa_score"]["status"] == "skipped"
    free = [r for r in ev.rows if r["prompt"] == "a dog" and r["source"] == "generated"][0]
    assert free["colour_correct"] is None and 0 <= free["clip_score"] <= 100
    # same seeds -> same samples
    again = evaluate(m, specs[:1], cfg)
    assert torch.allclose(again.atlases[0], ev.atlases[0], atol=1e-5)


def test_gallery_escapes_and_links():
    page = gallery_html([{"prompt": "a <b>red</b> cube", "turntable": "turntables/000-a.gif", "atlas": None,
                          "scores": {"colour_correct": True, "clip_score": None}}], {"prompts": 1})
    assert "&lt;b&gt;red" in page and "turntables/000-a.gif" in page and "<b>red</b>" not in page
    assert slug("A red torus!") == "a-red-torus" and slug("???") == "prompt"


def test_gallery_with_root_embeds_its_pictures_as_data_uris(tmp_path):
    """MLflow shows HTML artifacts in a sandboxed frame where relative paths break: every picture is inside."""
    import base64
    import io
    import re

    from PIL import Image

    from gaussian_atlas.io import write_png
    from gaussian_atlas.sample import write_gif

    frames = np.zeros((3, 8, 8, 3), np.uint8)
    frames[1, 2:6, 2:6] = (200, 30, 30)
    write_gif(tmp_path / "turntables" / "000-a.gif", frames)
    write_png(tmp_path / "atlases" / "000-a.png", np.full((4, 6, 3), 120, np.uint8))
    page = gallery_html([{"prompt": "a red cube", "turntable": "turntables/000-a.gif", "atlas": "atlases/000-a.png",
                          "scores": {}}], root=tmp_path)
    srcs = re.findall(r"<img src='([^']*)'", page)
    assert len(srcs) == 2 and all(s.startswith("data:image/") for s in srcs)
    assert "turntables/" not in page and "atlases/" not in page
    for s, kind, size in zip(srcs, ("GIF", "PNG"), ((8, 8), (6, 4))):
        mime, data = re.fullmatch(r"data:(image/\w+);base64,([A-Za-z0-9+/=]+)", s).groups()
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            assert im.format == kind and mime == f"image/{kind.lower()}" and im.size == size
            assert getattr(im, "n_frames", 1) == (3 if kind == "GIF" else 1)
            im.load()


def test_ceiling_is_the_first_training_atlas_with_the_prompt_as_caption(tmp_path):
    import pandas as pd

    from gaussian_atlas.evaluate import ceiling_atlases

    rows = []
    for i, cap in enumerate(["a red cube", "A  Red Cube", "a blue cone"]):
        np.savez(tmp_path / f"{i}.npz", atlas=np.full((16, 2, 2), float(i)))
        rows.append({"id": f"obj-{2 - i}", "caption": cap, "path": f"{i}.npz"})  # ids in reverse file order
    index = pd.DataFrame(rows)
    specs = [PromptSpec("a red cube", (("cube", "red"),), False, "single"),
             PromptSpec("a green torus", (("torus", "green"),), True, "single"),
             PromptSpec("a blue cone", (("cone", "blue"),), False, "single")]
    c = ceiling_atlases(index, tmp_path, specs)
    assert sorted(c) == [0, 2]  # the held-out prompt has no ceiling
    assert c[0].shape == (1, 16, 2, 2) and c[0][0, 0, 0, 0] == 1.0  # "A  Red Cube" (obj-1) before obj-2 by id
    assert c[2].dtype == np.float32 and c[2].shape == (1, 16, 2, 2) and c[2][0, 0, 0, 0] == 2.0
    c = ceiling_atlases(index, tmp_path, specs, limit=4)  # one per sample, as many as there are
    assert c[0].shape == (2, 16, 2, 2) and [a[0, 0, 0] for a in c[0]] == [1.0, 0.0]


def test_samples_per_prompt_seen_and_held_out_with_intervals(tiny_model_dir):
    """Several samples per prompt: seeds differ per sample, every source has a row per sample, seen and
    held-out blocks carry 95 % intervals that contain their mean, and the ceiling of sample k is atlas k."""
    from gaussian_atlas.sample import load_atlas_model

    m = load_atlas_model(tiny_model_dir)
    train = ["a red cube", "a blue sphere", "a green torus", "a red cone on top of a blue cube"]
    specs = benchmark_prompts(train, n_seen=2, n_held_out=1, n_compositions=0, held_out_captions=["a green cube"])
    assert [s.held_out for s in specs] == [False, False, True] and specs[2].prompt == "a green cube"
    cfg = EvaluateConfig(n_views=2, resolution=16, rotations=2, shape_points=128, samples_per_prompt=3,
                         n_bootstrap=200, sample=SampleConfig(steps=2, frames=2, resolution=16))
    ceiling = {2: np.stack([m.mean.numpy(), m.mean.numpy() + 1.0])}  # two ceiling fits of the held-out prompt
    ev = evaluate(m, specs, cfg, ceiling)
    assert ev.atlases.shape[0] == 9 and len(set(ev.seeds)) == 9
    assert ev.sample_of == [(i, k) for i in range(3) for k in range(3)]
    assert ev.objects["ceiling"] == [6, 7, 8] and len(ev.rows) == 9 + 3 + 9
    mt = ev.metrics
    assert mt["samples_per_prompt"] == 3 and mt["n_samples"] == 9
    for src, n_seen, n_held in (("generated", 6, 3), ("floor", 6, 3), ("ceiling", 0, 3)):
        assert mt[src]["seen"]["n"] == n_seen and mt[src]["held_out"]["n"] == n_held
        b = mt[src]["held_out"]
        assert b["n_prompts"] == 1
        lo, hi = b["both_accuracy_ci95"]
        assert 0.0 <= lo <= b["both_accuracy"] <= hi <= 1.0
    gen = [r for r in ev.rows if r["source"] == "generated"]
    assert [(r["index"], r["sample"]) for r in gen] == ev.sample_of


def test_reuse_takes_over_ceiling_and_floor_of_an_earlier_checkpoint(tiny_model_dir):
    """A later checkpoint's evaluation with ``reuse`` scores only the generated objects and reports the
    same ceiling/floor as a full evaluation; another setup (prompts, ceiling) is refused."""
    from gaussian_atlas.sample import load_atlas_model

    m = load_atlas_model(tiny_model_dir)
    specs = benchmark_prompts(["a red cube", "a blue sphere"], n_seen=2, n_held_out=0, n_compositions=0)
    cfg = EvaluateConfig(n_views=2, resolution=16, rotations=2, shape_points=128, samples_per_prompt=2,
                         n_bootstrap=100, sample=SampleConfig(steps=2, frames=2, resolution=16))
    ceiling = {0: np.stack([m.mean.numpy()])}
    full = evaluate(m, specs, cfg, ceiling)
    with torch.no_grad():  # "a later checkpoint": other weights, same statistics and grid
        for p in m.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full2 = evaluate(m, specs, cfg, ceiling)
    again = evaluate(m, specs, cfg, ceiling, reuse=full)
    assert again.metrics["seconds"]["reused"] and "render_floor" not in again.metrics["seconds"]
    for src in ("ceiling", "floor"):
        assert again.metrics[src] == full2.metrics[src]
        assert np.array_equal(again.views[src], full2.views[src])
    assert again.metrics["generated"] == full2.metrics["generated"]
    assert [r for r in again.rows if r["source"] != "generated"] == [r for r in full2.rows if r["source"] != "generated"]
    with pytest.raises(ValueError, match="other prompts"):
        evaluate(m, specs[:1], cfg, ceiling, reuse=full)
    with pytest.raises(ValueError, match="ceiling"):
        evaluate(m, specs, cfg, {0: np.stack([m.mean.numpy() + 1.0])}, reuse=full)


def test_bootstrap_interval_resamples_prompts_then_samples():
    from gaussian_atlas.evaluate import bootstrap_ci

    # every prompt scores the same: no spread between prompts, so the interval is only within-prompt noise
    assert bootstrap_ci([1, 1, 1, 1], ["a", "a", "b", "b"]) == (1.0, 1.0)
    # two prompts, one always right, one always wrong: the interval spans most of [0, 1]
    lo, hi = bootstrap_ci([1, 1, 1, 1, 0, 0, 0, 0], list("aaaabbbb"), n_boot=4000, seed=1)
    assert lo == 0.0 and hi == 1.0
    # many prompts of mean 0.5: the interval holds 0.5 and narrows with more prompts
    rng = np.random.default_rng(0)
    vals = rng.random(400) < 0.5
    w_small = np.diff(bootstrap_ci(vals[:40], np.repeat(np.arange(10), 4)))[0]
    lo, hi = bootstrap_ci(vals, np.repeat(np.arange(100), 4))
    assert lo < 0.5 < hi and hi - lo < w_small
    assert bootstrap_ci([None, float("nan")], [0, 1]) is None


def test_declared_held_out_prompt_in_training_is_a_leak():
    with pytest.raises(ValueError, match="leak.*a red cube"):
        benchmark_prompts(["a red cube", "a blue cone"], 1, 1, 0, held_out_captions=["a red cube"])
    with pytest.raises(ValueError, match="leak"):  # a held-out pair seen as a part of a stack
        benchmark_prompts(["a red cube on top of a blue cube"], 1, 1, 0, held_out_captions=["a red cube"])
