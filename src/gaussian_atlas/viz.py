"""Pictures people would rather look at than numbers: contact sheets of renders."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np

__all__ = ["on_white", "contact_sheet"]


def on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a straight-alpha ``[H, W, 4]`` uint8 image on white -> ``[H, W, 3]`` uint8."""
    rgba = np.asarray(rgba)
    if rgba.ndim == 3 and rgba.shape[2] == 3:
        return rgba.astype(np.uint8)
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.clip(rgb * a + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)


def contact_sheet(images: Sequence[np.ndarray], labels: Sequence[str] | None = None, ncols: int = 8,
                  tile: int = 128, pad: int = 4, label_lines: int = 3) -> np.ndarray:
    """Tile images (RGB or RGBA, any size) into one RGB picture with a caption under each.

    Parameters
    ----------
    images : ``[H, W, 3|4]`` uint8 images; RGBA is composited on white.
    labels : one caption per image (wrapped to ``label_lines`` lines), or None.
    ncols : tiles per row.
    tile : each image is resized to ``tile x tile``.

    Returns
    -------
    ``[H_sheet, W_sheet, 3]`` uint8.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not len(images):
        raise ValueError("contact_sheet needs at least one image")
    font = ImageFont.load_default()
    line_h = 12 if labels else 0
    ncols = max(1, min(ncols, len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    cell_w, cell_h = tile + pad, tile + pad + line_h * label_lines
    sheet = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, tile // 6)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = pad + c * cell_w, pad + r * cell_h
        im = Image.fromarray(on_white(img)).resize((tile, tile), Image.Resampling.LANCZOS)
        sheet.paste(im, (x, y))
        if labels:
            lines = textwrap.wrap(str(labels[i]), chars)[:label_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + tile + 1 + j * line_h), line, fill=(20, 20, 20), font=font)
    return np.asarray(sheet)
