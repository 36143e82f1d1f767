"""`gatlas generate`: a PLY every viewer reads, a turntable GIF and the atlas picture per prompt; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from gaussian_atlas.cli import main


def test_generate_writes_ply_gif_and_atlas_per_prompt(tiny_model_dir, tmp_path, capsys):
    import imageio.v3 as iio
    from PIL import Image

    from gaussian_atlas.gaussians import read_ply

    out = tmp_path / "gen"
    main(["generate", "a red torus", "a red torus", "a blue cube", "--model", str(tiny_model_dir), "--out", str(out),
          "--steps", "2", "--frames", "3", "--resolution", "24", "--seed", "7"])
    printed = capsys.readouterr().out
    for name in ("a-red-torus", "a-red-torus-2", "a-blue-cube"):  # repeated prompts do not overwrite
        g = read_ply(out / f"{name}.ply")  # INRIA fields, finite, non-zero quaternions (read_ply checks)
        assert len(g) == 8 * 8 and g.means.abs().max() < 10
        frames = iio.imread(out / f"{name}.gif", index=None)
        assert frames.shape[0] == 3 and frames.shape[1:3] == (24, 24)
        with Image.open(out / f"{name}_atlas.png") as im:
            assert im.size[1] == 16  # 8 px atlas at scale 2
        assert str(out / f"{name}.ply") in printed
    assert "(seed 7)" in printed and "(seed 8)" in printed  # prompt i gets seed + i
    # the same prompt and seed give the same object
    main(["generate", "a red torus", "--model", str(tiny_model_dir), "--out", str(tmp_path / "again"),
          "--steps", "2", "--frames", "2", "--resolution", "16", "--seed", "7"])
    a, b = read_ply(out / "a-red-torus.ply"), read_ply(tmp_path / "again" / "a-red-torus.ply")
    assert np.allclose(a.means.numpy(), b.means.numpy(), atol=1e-5)


def test_generate_without_a_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a red torus", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "unet is missing" in err[0] and "train stage" in err[0]
    assert not (tmp_path / "o").exists()
