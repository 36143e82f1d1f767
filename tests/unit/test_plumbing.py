"""Config, atomic IO, contact sheets and the gatlas CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from gaussian_atlas import io as gio
from gaussian_atlas.config import flatten, from_dict, to_dict
from gaussian_atlas.viz import contact_sheet, on_white


@dataclass(frozen=True)
class Inner:
    a: int = 1
    pairs: tuple = ((1, 2),)


@dataclass(frozen=True)
class Outer:
    x: float = 0.5
    inner: Inner = field(default_factory=Inner)


def test_from_dict_nested_and_unknown_keys():
    cfg = from_dict(Outer, {"x": 2.0, "inner": {"a": 3, "pairs": [[4, 5]]}})
    assert cfg == Outer(x=2.0, inner=Inner(a=3, pairs=((4, 5),)))
    hash(cfg)  # nested lists became tuples: still hashable
    assert to_dict(cfg)["inner"]["a"] == 3
    with pytest.raises(ValueError, match=r"params: unknown key\(s\) \['y'\]"):
        from_dict(Outer, {"y": 1}, "params")
    with pytest.raises(ValueError, match=r"params.inner: unknown key\(s\) \['b'\]"):
        from_dict(Outer, {"inner": {"b": 1}}, "params")
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    gio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with gio.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert gio.read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    f = gio.write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    with gio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "b").write_text("y")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask


def test_atomic_dir_swaps_whole_folder(tmp_path):
    d = tmp_path / "obj"
    with gio.atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyError):
        with gio.atomic_dir(d) as tmp:
            (tmp / "b.txt").write_text("2")
            raise KeyError("boom")
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]
    with gio.atomic_dir(d) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj"]


def test_write_png_round_trip(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (7, 5, 4), dtype=np.uint8)
    gio.write_png(tmp_path / "a.png", img)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), img)
    with pytest.raises(TypeError):
        gio.write_png(tmp_path / "b.png", img.astype(np.float32))


def test_on_white_and_contact_sheet():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[1, 1] = (0, 0, 255, 128)
    w = on_white(rgba)
    assert tuple(w[0, 0]) == (255, 0, 0) and tuple(w[3, 3]) == (255, 255, 255)
    assert tuple(w[1, 1]) == (127, 127, 255)
    sheet = contact_sheet([rgba] * 5, ["a red thing"] * 5, ncols=2, tile=16, pad=2, label_lines=2)
    assert sheet.shape[1] == 2 * (16 + 2) + 2 and sheet.dtype == np.uint8
    rows = 3
    assert sheet.shape[0] == rows * (16 + 2 + 2 * 12) + 2
    assert (sheet[12:18, 12:18] == 255).all()  # the first tile: white away from its coloured pixels
    assert sheet[2:5, 2:5, 0].mean() > 200 and sheet[2:5, 2:5, 2].mean() < 120  # its red corner
    with pytest.raises(ValueError):
        contact_sheet([])


def _gatlas(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("gatlas")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gaussian_atlas.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd)


def test_cli_help_and_one_line_errors(tmp_path):
    h = _gatlas("--help")
    assert h.returncode == 0 and "render-mesh" in h.stdout and "dvc repro" in h.stdout
    r = _gatlas("ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: dataset path does not exist: {tmp_path / 'nope'}"
    (tmp_path / "empty").mkdir()
    r = _gatlas("ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.startswith("error: no objects found") and "Traceback" not in r.stderr
    r = _gatlas("render-mesh", str(tmp_path / "missing.glb"), "--caption", "x", "--out", str(tmp_path / "m"))
    assert r.returncode == 1 and "missing.glb" in r.stderr and "Traceback" not in r.stderr


def test_cli_ingest_nerf_dataset(nerf_dataset, tmp_path):
    root, caps, ids = nerf_dataset
    r = _gatlas("ingest", str(root), "--captions", str(caps), "--out", str(tmp_path / "o"), "--min-views", "4")
    assert r.returncode == 0, r.stderr
    assert "5/5 accepted" in r.stdout


def test_gatlas_metrics_prints_a_few_lines_per_stage(tmp_path, capsys):
    import json

    from gaussian_atlas.cli import main

    (tmp_path / "fit.json").write_text(json.dumps({"psnr_mean": 25.123456, "channels": {"a": {"b": 1}}}))
    ci = [0.25, 0.75]
    split = {"seen": {"both_accuracy": 0.5, "both_accuracy_ci95": ci, "n": 8},
             "held_out": {"both_accuracy": 0.25, "both_accuracy_ci95": [0.0, 0.5], "n": 4}}
    (tmp_path / "evaluate.json").write_text(json.dumps({"n_prompts": 3, "generated": split, "floor": split}))
    (tmp_path / "generate.json").write_text(json.dumps({"n_objects": 2}))
    main(["metrics", "--dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("generate") and out[1].startswith("fit") and out[2].startswith("evaluate")  # stage order
    assert "psnr_mean=25.12" in out[1] and "channels" not in out[1]
    assert "generated both right  seen: 0.5 [0.25, 0.75] (n=8); held_out: 0.25 [0.00, 0.50] (n=4)" in out[3]
    main(["metrics", "--dir", str(tmp_path), "--all"])
    assert "fit.channels.a.b = 1" in capsys.readouterr().out
