"""The evaluation prompts: captions of the built-in generator parsed into parts, the built-in benchmark
prompts (seen, held-out, compositions) and prompts read from a text file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import EvaluateConfig


CHANCE = {"colour": 1.0 / 12, "shape": 1.0 / 9, "both": 1.0 / 108}
"""Chance accuracy of a single-part prompt (12 colours, 9 shapes)."""


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt.

    parts : ``((shape, colour), ...)`` top first as in the caption, or None when the prompt
        is not a generator caption (then only CLIP/VQA apply).
    held_out : the caption never occurs among the training captions (for singles: the
        shape x colour combination never occurs as any part of any training caption).
    kind : "single", "composition" or "free".
    """

    prompt: str
    parts: tuple[tuple[str, str], ...] | None
    held_out: bool
    kind: str


def _caption_re() -> re.Pattern:
    from ..procedural import COLORS, SHAPE_NOUNS

    colours = "|".join(sorted(map(re.escape, COLORS), key=len, reverse=True))
    nouns = "|".join(sorted(map(re.escape, SHAPE_NOUNS.values()), key=len, reverse=True))
    return re.compile(rf"^(?:a|an)\s+({colours})\s+({nouns})$")


def parse_caption(text: str) -> tuple[tuple[str, str], ...] | None:
    """``"a red cube on top of a blue cylinder"`` -> ``(("cube", "red"), ("cylinder", "blue"))``.

    Parts are ``(shape key, colour)``, top first. None when ``text`` is not a caption of
    the built-in generator (case and surrounding whitespace are ignored).
    """
    from ..procedural import SHAPE_NOUNS

    noun_to_shape = {v: k for k, v in SHAPE_NOUNS.items()}
    pat = _caption_re()
    parts = []
    for phrase in re.split(r"\s+on\s+top\s+of\s+", " ".join(text.lower().split())):
        m = pat.match(phrase)
        if m is None:
            return None
        parts.append((noun_to_shape[m.group(2)], m.group(1)))
    return tuple(parts) if 1 <= len(parts) <= 2 else None


def _caption_of(parts: Sequence[tuple[str, str]]) -> str:
    from ..procedural import _caption

    return _caption([{"shape": s, "color": c} for s, c in parts])


def _round_robin(items: list, key, rng: np.random.Generator, n: int) -> list:
    """``n`` items spread over the values of ``key`` (e.g. one shape after another), shuffled by ``rng``."""
    groups: dict[Any, list] = {}
    for i in rng.permutation(len(items)):
        groups.setdefault(key(items[int(i)]), []).append(items[int(i)])
    order = [groups[k] for k in sorted(groups, key=lambda k: str(k))]
    order = [order[int(i)] for i in rng.permutation(len(order))]
    out: list = []
    while len(out) < n and any(order):
        for g in order:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def benchmark_prompts(train_captions: Sequence[str], n_seen: int = 6, n_held_out: int = 4,
                      n_compositions: int = 2, seed: int = 0,
                      held_out_captions: Sequence[str] | None = None) -> list[PromptSpec]:
    """The built-in evaluation prompts, deterministic in ``(train_captions, counts, seed, held_out_captions)``.

    * ``n_seen`` single-part captions that occur in training (spread over shapes);
    * ``n_held_out`` shape x colour combinations that occur in **no** training caption,
      neither alone nor as a part of a composition, though the shape and the colour each do
      (so every word is known to the text encoder): compositional generalisation;
    * ``n_compositions`` two-part stacks, alternately a training caption and a new one
      (top: any shape, bottom: a flat-topped one, two colours).

    ``held_out_captions``: the prompts the data set declares held out (the captions of its
    ``split == "ceiling"`` objects, :func:`gaussian_atlas.procedural.holdout_sets`). When
    given, held-out singles and new stacks are taken from them (a ceiling exists for each),
    and a declared prompt found among the training captions raises ``ValueError`` (a leak).

    Fewer prompts come back when the training set does not have enough of a kind (e.g.
    every combination seen): the caller records the counts.
    """
    from ..procedural import COLORS, SHAPES, STACK_BOTTOM_SHAPES

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xE7A1]))
    parsed = [p for p in (parse_caption(c) for c in train_captions) if p]
    train_set = {_caption_of(p) for p in parsed}
    seen_parts = {part for p in parsed for part in p}
    seen_shapes = {s for s, _ in seen_parts}
    seen_colours = {c for _, c in seen_parts}
    singles = sorted({p for p in parsed if len(p) == 1})
    out = [PromptSpec(_caption_of(p), p, False, "single")
           for p in _round_robin(singles, lambda p: p[0][0], rng, n_seen)]
    declared = None
    if held_out_captions is not None:
        declared = sorted({p for p in (parse_caption(c) for c in held_out_captions) if p})
        leaks = [_caption_of(p) for p in declared
                 if _caption_of(p) in train_set or (len(p) == 1 and p[0] in seen_parts)]
        if leaks:
            raise ValueError(f"held-out prompts occur in the training captions (split leak): {leaks[:5]}")
        novel = [p for p in declared if len(p) == 1]
    else:
        novel = [((s, c),) for s in SHAPES for c in COLORS
                 if (s, c) not in seen_parts and s in seen_shapes and c in seen_colours]
    out += [PromptSpec(_caption_of(p), p, True, "single")
            for p in _round_robin(novel, lambda p: p[0][0], rng, n_held_out)]
    comps_seen = sorted({p for p in parsed if len(p) == 2})
    comps_seen = [comps_seen[int(i)] for i in rng.permutation(len(comps_seen))]
    colours = sorted(COLORS)
    comps_new: list = []
    if declared is not None:
        comps_new = [p for p in declared if len(p) == 2]
    while declared is None and len(comps_new) < n_compositions and seen_shapes:
        top = SHAPES[int(rng.integers(len(SHAPES)))]
        bottom = STACK_BOTTOM_SHAPES[int(rng.integers(len(STACK_BOTTOM_SHAPES)))]
        c1, c2 = (colours[int(j)] for j in rng.choice(len(colours), size=2, replace=False))
        p = ((top, c1), (bottom, c2))
        if _caption_of(p) not in train_set and p not in comps_new:
            comps_new.append(p)
    for i in range(n_compositions):
        src = comps_seen if (i % 2 == 0 and comps_seen) else comps_new
        if not src:
            src = comps_new or comps_seen
        if not src:
            break
        p = src.pop(0)
        out.append(PromptSpec(_caption_of(p), p, _caption_of(p) not in train_set, "composition"))
    return out


def index_prompts(index: Any, cfg: "EvaluateConfig") -> list[PromptSpec]:
    """The built-in prompts for an atlas stage's ``index.parquet`` (a DataFrame): seen prompts from
    the training split's captions; held-out prompts from the captions of its ``split == "ceiling"``
    objects when it has any (the data set's declared held-out prompts), else from the shape x colour
    pairs no training caption has (:func:`benchmark_prompts`)."""
    from ..atlas import training_rows

    captions = [str(c) for c in training_rows(index)["caption"].fillna("")]
    held = None
    if "split" in index.columns and (index["split"] == "ceiling").any():
        held = sorted(set(index.loc[index["split"] == "ceiling", "caption"].astype(str)))
    return benchmark_prompts(captions, cfg.n_seen, cfg.n_held_out, cfg.n_compositions, cfg.seed, held)


def read_prompts(path: str | Path, train_captions: Sequence[str] = ()) -> list[PromptSpec]:
    """Prompts of a text file (one per line; blank lines and ``#`` comments skipped).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file does not exist: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    train = {" ".join(c.lower().split()) for c in train_captions}
    train_parts = {part for c in train_captions for part in (parse_caption(c) or ())}
    out = []
    for p in prompts:
        parts = parse_caption(p)
        kind = "free" if parts is None else ("single" if len(parts) == 1 else "composition")
        if parts is not None and len(parts) == 1:
            held = parts[0] not in train_parts
        else:
            held = " ".join(p.lower().split()) not in train
        out.append(PromptSpec(p, parts, held, kind))
    return out
