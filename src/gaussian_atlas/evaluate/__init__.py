"""Evaluation of text -> Gaussian Atlas -> 3D Gaussians (paper Sec. 6) and an offline prompt-fidelity benchmark.

Three families of scores, each computed for the **generated** objects, for the
**ceiling** (the training atlases whose caption is the prompt, decoded the same way)
and for the **floor** (random atlases: standard normal noise in the normalised space,
de-normalised with the model's statistics and decoded the same way):

* procedural prompt fidelity, colour and shape (needs no downloaded weights):
  :mod:`.scoring`, with :mod:`.colours` (views, renders, palettes) and :mod:`.shapes`
  (Chamfer distance to the generator's primitives);
* CLIP score and VQA score (weights on disk only): :mod:`.clip_vqa`.

:mod:`.config` holds the settings, :mod:`.prompts` the prompts, :mod:`.run` the whole
evaluation (:func:`evaluate`) and :mod:`.report` the HTML gallery. Submodules import
downward only (config <- prompts, shapes <- colours; both <- scoring <- run; clip_vqa <- run;
report on its own), never this package.
"""

from __future__ import annotations

from .clip_vqa import ClipScorer, VqaScorer, load_clip, load_vqa, skipped
from .colours import (alpha_weighted_colour, nearest_colour, object_colours, object_palettes, on_white_u8,
                      random_views, render_premultiplied, rendered_palette)
from .config import SOURCES, EvaluateConfig
from .prompts import CHANCE, PromptSpec, benchmark_prompts, index_prompts, parse_caption, read_prompts
from .report import gallery_html, slug
from .run import Evaluation, ceiling_atlases, evaluate
from .scoring import bootstrap_ci, random_atlases, score_objects, summarise
from .shapes import (candidate_clouds, chamfer, classify_shape, classify_shapes, height_frame, junction_height,
                     normalise_points, split_height, surface_points)

__all__ = ["EvaluateConfig", "PromptSpec", "parse_caption", "benchmark_prompts", "index_prompts", "read_prompts", "random_views",
           "rendered_palette", "object_palettes", "nearest_colour", "render_premultiplied", "alpha_weighted_colour", "object_colours",
           "surface_points", "normalise_points", "height_frame", "chamfer", "candidate_clouds", "junction_height",
           "split_height", "classify_shape", "random_atlases", "score_objects", "summarise", "bootstrap_ci",
           "ClipScorer", "load_clip", "VqaScorer", "load_vqa", "Evaluation", "evaluate", "skipped", "gallery_html", "slug", "CHANCE",
           "SOURCES", "on_white_u8", "classify_shapes", "ceiling_atlases"]
