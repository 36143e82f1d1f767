"""The built-in procedural dataset: coloured primitives and two-part stacks.

This is the pipeline's embedded default, so it runs with no download: each
object is a watertight ``trimesh`` primitive (or two, stacked along +Z) with
a named per-face colour, rendered by :mod:`gaussian_atlas.meshrender` into
the NeRF-synthetic layout with a caption such as ``"a red cube"`` or
``"a red cube on top of a blue cylinder"``.

Conventions
-----------
World +Z up, right-handed; cameras are camera-to-world in the OpenGL
convention (see :mod:`gaussian_atlas.cameras`). Every object is normalised
by the renderer (bounding-box centre at the origin, farthest vertex at
``object_radius``), so the primitives' own sizes only matter relative to
each other within a stack.

Layout written by :func:`generate_dataset`::

    out_root/captions.jsonl              {"id": "proc-00000", "caption": "..."} per line
    out_root/objects/proc-00000/         one NeRF-synthetic folder per object
        transforms.json  images/r_000.png ...  surface_samples.npz  object.json

Determinism: :func:`object_specs` depends only on the config, and object
``i`` is built and rendered from a seed derived from ``(cfg.seed, i)``, so
the output does not depend on the number of workers or on which objects
were already on disk.
"""

from __future__ import annotations

import json
import shutil
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import trimesh

from .io import write_text
from .meshrender import RenderConfig, object_folder_complete, render_object_folder

__all__ = [
    "SHAPES",
    "SHAPE_NOUNS",
    "COLORS",
    "STACK_BOTTOM_SHAPES",
    "HoldoutConfig",
    "ProceduralConfig",
    "holdout_sets",
    "make_primitive",
    "object_specs",
    "object_seed",
    "build_object",
    "generate_dataset",
    "render_worker_init",
]

# shape key -> noun used in captions
SHAPE_NOUNS: dict[str, str] = {
    "cube": "cube",
    "sphere": "sphere",
    "cylinder": "cylinder",
    "cone": "cone",
    "torus": "torus",
    "capsule": "capsule",
    "pyramid": "pyramid",
    "prism": "triangular prism",
    "octahedron": "octahedron",
}
SHAPES: tuple[str, ...] = tuple(SHAPE_NOUNS)

# shapes with a flat top that another part can rest on (a torus would let it sink into the hole)
STACK_BOTTOM_SHAPES: tuple[str, ...] = ("cube", "cylinder", "prism")
# size of an upper part relative to the part it rests on
STACK_TOP_SCALE: float = 0.75

# named colours, sRGB uint8; chosen to be unmistakable after shading
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (40, 170, 50),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 180),
    "pink": (245, 125, 180),
    "cyan": (30, 200, 215),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
}


@dataclass(frozen=True)
class HoldoutConfig:
    """Prompts kept out of the 3D training set (``params.yaml: generate.holdout``).

    singles
        Shape x colour pairs never rendered into a training object, neither alone nor as
        a part of a stack; chosen spread over shapes and colours (see :func:`holdout_sets`).
    compositions
        Two-part stacks (top, bottom) whose caption never occurs among the training objects
        (their parts may, so every word is known).
    ceiling_per_prompt
        Extra objects rendered per held-out prompt with split ``"ceiling"``: they are fit
        and turned into atlases like the rest but never trained on; the evaluation uses
        them as the held-out prompts' ceiling (what a perfect model of the fits would score).
    seed
        Offset of the choice (the generator's ``seed`` is mixed in).
    """

    singles: int = 0
    compositions: int = 0
    ceiling_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.singles <= len(SHAPES) * len(COLORS) - 1:
            raise ValueError(f"holdout.singles must be in [0, {len(SHAPES) * len(COLORS) - 1}], got {self.singles}")
        if self.compositions < 0 or self.ceiling_per_prompt < 0:
            raise ValueError("holdout.compositions and holdout.ceiling_per_prompt must be >= 0, got "
                             f"{self.compositions}, {self.ceiling_per_prompt}")


@dataclass(frozen=True)
class ProceduralConfig:
    """The built-in dataset.

    Parameters
    ----------
    n_objects
        Objects to generate.
    composition_fraction
        Fraction of objects that are two-part stacks (spread evenly over the ids).
    seed
        Master seed: shape/colour choices and every per-object seed derive from it.
    render
        Views, resolution and shading of the renders.
    workers
        Processes rendering objects in parallel; 0 or 1 renders in-process.
    holdout
        Prompts kept out of the training objects, and the ceiling objects rendered for them.
    """

    n_objects: int = 48
    composition_fraction: float = 0.25
    seed: int = 0
    render: RenderConfig = field(default_factory=RenderConfig)
    workers: int = 2
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)

    def __post_init__(self) -> None:
        if isinstance(self.render, Mapping):  # a params.yaml section
            object.__setattr__(self, "render", RenderConfig(**self.render))
        if isinstance(self.holdout, Mapping):
            object.__setattr__(self, "holdout", HoldoutConfig(**self.holdout))
        if self.n_objects < 0:
            raise ValueError(f"n_objects must be >= 0, got {self.n_objects}")
        if not 0.0 <= self.composition_fraction <= 1.0:
            raise ValueError(f"composition_fraction must be in [0, 1], got {self.composition_fraction}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


# --------------------------------------------------------------------------- primitives


def make_primitive(shape: str) -> trimesh.Trimesh:
    """A watertight primitive of roughly unit size, axis along +Z, resting around the origin.

    Raises
    ------
    ValueError
        For an unknown ``shape`` (known: :data:`SHAPES`).
    """
    c = trimesh.creation
    if shape == "cube":
        return c.box(extents=(1.0, 1.0, 1.0))
    if shape == "sphere":
        return c.icosphere(subdivisions=3, radius=0.6)
    if shape == "cylinder":
        return c.cylinder(radius=0.5, height=1.0, sections=48)
    if shape == "cone":
        return c.cone(radius=0.55, height=1.1, sections=48)
    if shape == "torus":
        return c.torus(major_radius=0.5, minor_radius=0.2, major_sections=48, minor_sections=24)
    if shape == "capsule":
        return c.capsule(height=0.8, radius=0.35, count=[32, 16])
    if shape == "pyramid":
        vertices = np.array(
            [[-0.55, -0.55, 0.0], [0.55, -0.55, 0.0], [0.55, 0.55, 0.0], [-0.55, 0.55, 0.0], [0.0, 0.0, 1.0]]
        )  # [5, 3] square base + apex
        faces = np.array([[0, 2, 1], [0, 3, 2], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
        return trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
    if shape == "prism":
        return c.cylinder(radius=0.6, height=0.9, sections=3)
    if shape == "octahedron":
        vertices = np.array(
            [[0.6, 0, 0], [-0.6, 0, 0], [0, 0.6, 0], [0, -0.6, 0], [0, 0, 0.75], [0, 0, -0.75]], dtype=np.float64
        )  # [6, 3]
        faces = np.array(
            [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
        )
        return trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _varied_part(shape: str, rgb: tuple[int, int, int], rng: np.random.Generator) -> trimesh.Trimesh:
    """Primitive with anisotropic scale in [0.8, 1.2] per axis, random turn about +Z, face colour ``rgb``."""
    mesh = make_primitive(shape)
    scale = np.diag(np.append(rng.uniform(0.8, 1.2, size=3), 1.0))  # [4, 4]
    turn = trimesh.transformations.rotation_matrix(rng.uniform(0.0, 2.0 * math.pi), [0.0, 0.0, 1.0])
    mesh.apply_transform(turn @ scale)
    mesh.visual.face_colors = np.array([*rgb, 255], dtype=np.uint8)
    return mesh


def build_object(spec: Mapping[str, Any]) -> trimesh.Trimesh:
    """The mesh of one spec from :func:`object_specs`; parts stacked bottom-up along +Z.

    ``spec["parts"]`` lists parts top first (caption order); each rests on
    the one below, centred on it in XY, scaled by :data:`STACK_TOP_SCALE`.
    """
    rng = np.random.default_rng(int(spec["seed"]))
    parts = list(spec["parts"])
    meshes = []
    top_z, center_xy = None, None
    for level, part in enumerate(reversed(parts)):  # bottom first
        mesh = _varied_part(part["shape"], tuple(part["rgb"]), rng)
        if level > 0:
            mesh.apply_scale(STACK_TOP_SCALE)  # a smaller part resting on a larger one reads as "on top of"
        lo, hi = mesh.bounds
        if top_z is None:
            mesh.apply_translation([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, -lo[2]])
        else:
            mesh.apply_translation([center_xy[0] - (lo[0] + hi[0]) / 2, center_xy[1] - (lo[1] + hi[1]) / 2, top_z - lo[2]])
        lo, hi = mesh.bounds
        top_z, center_xy = hi[2], (lo[:2] + hi[:2]) / 2
        meshes.append(mesh)
    return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)


# --------------------------------------------------------------------------- specs


def object_seed(master_seed: int, index: int) -> int:
    """Seed of object ``index``: a 31-bit integer derived from ``(master_seed, index)``."""
    return int(np.random.SeedSequence([int(master_seed), int(index)]).generate_state(1)[0] & 0x7FFFFFFF)


def _part(shape: str, color: str) -> dict[str, Any]:
    return {"shape": shape, "color": color, "rgb": list(COLORS[color])}


def _caption(parts: list[dict[str, Any]]) -> str:
    """``"a red cube"``, ``"an orange cone on top of a blue cylinder"`` (parts top first)."""
    phrases = []
    for p in parts:
        article = "an" if p["color"][0] in "aeiou" else "a"
        phrases.append(f"{article} {p['color']} {SHAPE_NOUNS[p['shape']]}")
    return " on top of ".join(phrases)


def holdout_sets(cfg: ProceduralConfig) -> tuple[list[tuple[str, str]], list[tuple[tuple[str, str], tuple[str, str]]]]:
    """The held-out ``(shape, colour)`` pairs and ``((top shape, colour), (bottom shape, colour))`` stacks.

    Singles are spread over shapes and colours: pair ``k`` takes colour ``k mod 12`` and
    shape ``k mod 9`` of two seeded permutations, so 12 held-out pairs use every colour
    once and every shape once or twice. Stacks are drawn like the generator's (top: any
    shape, bottom: a flat-topped one, two different colours) and never use a held-out pair
    as a part, so that a stack's score measures composition, not an unseen part.
    Deterministic in ``(cfg.seed, cfg.holdout)``.
    """
    h = cfg.holdout
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(h.seed), 0x401D]))
    colours, shapes = list(COLORS), list(SHAPES)
    cperm, sperm = rng.permutation(len(colours)), rng.permutation(len(shapes))
    singles: list[tuple[str, str]] = []
    k = 0
    while len(singles) < h.singles:
        pair = (shapes[int(sperm[k % len(shapes)])], colours[int(cperm[(k + k // len(colours)) % len(colours)])])
        if pair not in singles:
            singles.append(pair)
        k += 1
    held = set(singles)
    stacks: list[tuple[tuple[str, str], tuple[str, str]]] = []
    while len(stacks) < h.compositions:
        top = shapes[int(rng.integers(len(shapes)))]
        bottom = STACK_BOTTOM_SHAPES[int(rng.integers(len(STACK_BOTTOM_SHAPES)))]
        c_top, c_bottom = (colours[int(j)] for j in rng.choice(len(colours), size=2, replace=False))
        st = ((top, c_top), (bottom, c_bottom))
        if st not in stacks and not ({st[0], st[1]} & held):
            stacks.append(st)
    return singles, stacks


def object_specs(cfg: ProceduralConfig) -> list[dict[str, Any]]:
    """The deterministic list of objects of the dataset.

    Singles cycle over every shape x colour pair in rounds: each round is a
    shuffled order of all shapes, each with its next (shuffled) colour, so
    any ``len(SHAPES)`` consecutive singles cover every shape. Every
    ``1 / composition_fraction``-th object (evenly spread) is a stack of two
    parts with different colours, the bottom one from
    :data:`STACK_BOTTOM_SHAPES`.

    With ``cfg.holdout``, the pairs and stacks of :func:`holdout_sets` never occur in
    the ``n_objects`` training objects (a held-out single is skipped in the cycle; a stack
    is redrawn until it uses no held-out pair and is not a held-out stack), and
    ``ceiling_per_prompt`` objects per held-out prompt follow them, with split
    ``"ceiling"`` (ids continue the numbering).

    Returns
    -------
    list of dict
        ``{"id": "proc-00000", "caption": str, "parts": [{"shape", "color",
        "rgb"}] (top first, as in the caption), "seed": int, "split": "train" | "ceiling"}``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x5EED]))
    color_names = list(COLORS)
    colors_per_shape = {s: [color_names[i] for i in rng.permutation(len(color_names))] for s in SHAPES}
    held_singles, held_stacks = holdout_sets(cfg)
    held = set(held_singles)
    singles: list[tuple[str, str]] = []
    for r in range(len(color_names)):
        for k in rng.permutation(len(SHAPES)):
            shape = SHAPES[int(k)]
            if (shape, colors_per_shape[shape][r]) not in held:
                singles.append((shape, colors_per_shape[shape][r]))

    f = float(cfg.composition_fraction)
    specs: list[dict[str, Any]] = []
    n_single = 0
    for i in range(cfg.n_objects):
        is_stack = math.floor((i + 1) * f + 1e-9) > math.floor(i * f + 1e-9)
        if is_stack:
            while True:
                top = SHAPES[int(rng.integers(len(SHAPES)))]
                bottom = STACK_BOTTOM_SHAPES[int(rng.integers(len(STACK_BOTTOM_SHAPES)))]
                c_top, c_bottom = (color_names[int(j)] for j in rng.choice(len(color_names), size=2, replace=False))
                if not ({(top, c_top), (bottom, c_bottom)} & held) and ((top, c_top), (bottom, c_bottom)) not in held_stacks:
                    break
            parts = [_part(top, c_top), _part(bottom, c_bottom)]
        else:
            shape, color = singles[n_single % len(singles)]
            n_single += 1
            parts = [_part(shape, color)]
        specs.append({"id": f"proc-{i:05d}", "caption": _caption(parts), "parts": parts,
                      "seed": object_seed(cfg.seed, i), "split": "train"})
    held_prompts = [[_part(*p)] for p in held_singles] + [[_part(*a), _part(*b)] for a, b in held_stacks]
    i = cfg.n_objects
    for parts in held_prompts:
        for _ in range(cfg.holdout.ceiling_per_prompt):
            specs.append({"id": f"proc-{i:05d}", "caption": _caption(parts), "parts": parts,
                          "seed": object_seed(cfg.seed, i), "split": "ceiling"})
            i += 1
    return specs


# --------------------------------------------------------------------------- dataset


def _render_one(spec: Mapping[str, Any], out_dir: str, render_cfg: RenderConfig) -> dict[str, Any]:
    mesh = build_object(spec)
    return render_object_folder(
        mesh,
        out_dir,
        caption=spec["caption"],
        object_id=spec["id"],
        cfg=render_cfg,
        seed=int(spec["seed"]),
        extra_meta={"parts": spec["parts"], "source": "procedural", "split": spec.get("split", "train"),
                    "config_hash": _spec_hash(spec, render_cfg)},
    )


def _spec_hash(spec: Mapping[str, Any], render_cfg: RenderConfig) -> str:
    """Content hash of what determines an object's folder (its spec and the render settings)."""
    import dataclasses
    import hashlib

    blob = json.dumps({"spec": dict(spec), "render": dataclasses.asdict(render_cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _up_to_date(folder: Path, spec: Mapping[str, Any], render_cfg: RenderConfig) -> bool:
    """Complete on disk and rendered from the same spec and settings (a rerun after a
    parameter change re-renders instead of keeping stale objects)."""
    if not object_folder_complete(folder):
        return False
    try:
        with open(folder / "object.json", encoding="utf-8") as fh:
            return json.load(fh).get("config_hash") == _spec_hash(spec, render_cfg)
    except (OSError, ValueError):
        return False


def render_worker_init(nice: int = 0) -> None:
    """Initialise a render process: one BLAS / OpenMP / torch thread (and ``nice`` added to its niceness).

    Each spawned renderer otherwise starts numpy's OpenBLAS with a thread per core, so ``W`` renderers run
    ``W x cores`` threads that contend for the cores: on the 2-core development machine two renderers took 1.45x as
    long per object as with one thread each (``benchmarks/bench_render_pool.py``), and on the 16-core GPU machine
    12 renderers took 15.7 s per object against ~4.5 s for one renderer alone here (docs/benchmarks.md, the
    end-to-end run). Limits are set with threadpoolctl (after numpy's import, which a spawned child does before
    any initializer runs); without threadpoolctl only torch is limited, said once as a warning.
    """
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency; a bare GPU image may lack it
        import warnings

        warnings.warn("threadpoolctl is not installed: render workers keep numpy's BLAS threads (pip install "
                      "threadpoolctl)", RuntimeWarning, stacklevel=2)
    else:
        threadpool_limits(limits=1)  # every BLAS / OpenMP pool of this process, for its lifetime
    import sys

    if "torch" in sys.modules:  # never import torch here: the renderers need only numpy / trimesh
        sys.modules["torch"].set_num_threads(1)


def generate_dataset(cfg: ProceduralConfig, out_root: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Render the procedural dataset to ``out_root`` (resumable).

    Object folders already complete on disk (``transforms.json`` and every
    image it lists, plus ``object.json`` and ``surface_samples.npz``) are
    skipped; others are (re)rendered, each written atomically. Then
    ``captions.jsonl`` is rewritten atomically, in id order.

    Parameters
    ----------
    cfg
        Dataset size, seed, render settings and worker count.
    out_root
        Root folder; objects go to ``out_root/objects/<id>/``.
    progress
        Show a tqdm bar over the objects rendered.

    Returns
    -------
    dict
        ``{"out_root", "n_objects", "n_rendered", "n_skipped", "seconds",
        "captions"}`` (``captions`` is the path of ``captions.jsonl``).
    """
    t0 = time.perf_counter()
    out_root = Path(out_root)
    objects_dir = out_root / "objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    specs = object_specs(cfg)
    todo = [s for s in specs if not _up_to_date(objects_dir / s["id"], s, cfg.render)]
    # Folders of objects no longer in the spec list (fewer objects asked for) go away.
    wanted = {s["id"] for s in specs}
    for stale in objects_dir.iterdir():
        if stale.is_dir() and stale.name not in wanted:
            shutil.rmtree(stale, ignore_errors=True)

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="procedural objects", unit="obj")
    try:
        if cfg.workers <= 1 or len(todo) <= 1:
            for spec in todo:
                _render_one(spec, str(objects_dir / spec["id"]), cfg.render)
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing as mp

            # spawn: safe even when the caller holds threads (Prefect, MLflow); workers import only numpy/trimesh
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=mp.get_context("spawn"),
                                     initializer=render_worker_init) as pool:
                futures = [pool.submit(_render_one, s, str(objects_dir / s["id"]), cfg.render) for s in todo]
                try:
                    for fut in as_completed(futures):
                        fut.result()  # re-raise a worker's error here
                        if bar is not None:
                            bar.update(1)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()

    captions = out_root / "captions.jsonl"
    write_text(captions, "".join(json.dumps({"id": s["id"], "caption": s["caption"], "split": s["split"]}) + "\n"
                                 for s in specs))
    held_singles, held_stacks = holdout_sets(cfg)
    write_text(out_root / "holdout.json", json.dumps({
        "singles": [_caption([_part(*p)]) for p in held_singles],
        "compositions": [_caption([_part(*a), _part(*b)]) for a, b in held_stacks],
        "ceiling_ids": [s["id"] for s in specs if s["split"] == "ceiling"]}, indent=1) + "\n")
    return {
        "out_root": str(out_root),
        "n_objects": len(specs),
        "n_train": sum(s["split"] == "train" for s in specs),
        "n_ceiling": sum(s["split"] == "ceiling" for s in specs),
        "n_rendered": len(todo),
        "n_skipped": len(specs) - len(todo),
        "seconds": time.perf_counter() - t0,
        "captions": str(captions),
    }
