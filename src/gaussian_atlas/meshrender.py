"""Headless CPU renderer: a mesh to NeRF-synthetic style RGBA views.

The renderer casts one ray per sub-pixel with trimesh's Embree backend
(``trimesh.ray.ray_pyembree.RayMeshIntersector`` on ``embreex``), looks the
colour up in the mesh's own visuals at each first hit and shades it with
fixed world-space directional lights; sub-pixels are box-filtered into
pixels, which gives anti-aliased colours and soft alpha edges. No OpenGL, no
display, no GPU.

Conventions
-----------
World and cameras
    Blender/NeRF-synthetic: world **+Z up**, right-handed;
    ``transform_matrix`` is camera-to-world in the **OpenGL camera
    convention** (camera looks down -Z, +Y up, +X right). Intrinsics are
    pinhole ``fl_x, fl_y, cx, cy, w, h`` in pixels and ``camera_angle_x`` is
    the horizontal FOV in radians. See :mod:`gaussian_atlas.cameras`.
Object normalisation
    :func:`normalize_mesh` maps a vertex ``v`` to ``(v - center) * scale``:
    the bounding-box centre of the (referenced) vertices goes to the origin
    and the farthest vertex lands at radius ``object_radius``. ``center``
    and ``scale`` are written to ``object.json`` so
    ``v_original = v_normalised / scale + center``.
Shading
    ``albedo * (ambient + sum_i intensity_i * max(0, n . l_i))``, clipped to
    [0, 1], where the ``l_i`` are **world-space** unit directions *towards*
    each light. The lights do not move with the camera, so a surface point
    has the same colour in every view (later stages fit view-independent
    Gaussian colours). Normals are flipped to face the camera (thin,
    single-sided surfaces are lit from the side they are seen from) and are
    smoothed across edges whose dihedral angle is below
    ``smooth_angle_deg`` (sharp edges such as a cube's stay sharp).
Colour source (in this order)
    a texture (UVs interpolated barycentrically, bilinear sample with
    repeat wrapping of ``PBRMaterial.baseColorTexture`` times
    ``baseColorFactor``, or ``SimpleMaterial.image``); a texture-less
    material's base colour; per-vertex colours (barycentric interpolation);
    per-face colours; else ``default_color`` grey. Colour values are used
    as stored (display-referred); a glTF factor-only base colour, which the
    format defines as linear, is converted to sRGB as trimesh does when it
    packs materials. Texture alpha is ignored (surfaces are opaque).
Output images
    ``[V, H, W, 4]`` uint8 RGBA with **straight (un-premultiplied) alpha**.
    RGB of fully transparent pixels is 255 (white), and partially covered
    edge pixels hold the object's colour, so compositing on white
    (``rgb * a + 255 * (1 - a)``) - what consumers of these renders do - and
    simply viewing the PNG on white both look right.

Folder layout written by :func:`render_object_folder` (NeRF-synthetic)::

    out_dir/transforms.json       camera_angle_x, fl_x, fl_y, cx, cy, w, h,
                                  frames: [{file_path: "images/r_000.png",
                                  transform_matrix, azimuth_deg, elevation_deg}]
    out_dir/images/r_000.png ...  RGBA
    out_dir/surface_samples.npz   points [n, 3] f32, normals [n, 3] f32, colors [n, 3] u8
    out_dir/object.json           id, caption, center, scale, object_radius, seed, ...

``file_path`` keeps its ``.png`` extension (some NeRF-synthetic loaders
append one; ours read the path as written).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import trimesh
from trimesh.visual import ColorVisuals, TextureVisuals
from trimesh.visual.material import PBRMaterial, SimpleMaterial

from .cameras import ViewConfig, camera_rays, complete_intrinsics, intrinsics, place_views
from .io import atomic_dir, write_json, write_npz, write_png

__all__ = [
    "DEFAULT_LIGHTS",
    "Y_UP_TO_Z_UP",
    "MAX_PART_TEXTURE",
    "RenderConfig",
    "MeshSurface",
    "load_mesh",
    "normalize_mesh",
    "ray_intersector",
    "first_hits",
    "shade_hits",
    "render_views",
    "sample_surface",
    "render_object_folder",
    "render_mesh_file",
    "object_folder_complete",
]

# (direction towards the light in world space, intensity); world is +Z up.
DEFAULT_LIGHTS: tuple[tuple[tuple[float, float, float], float], ...] = (
    ((0.35, -0.45, 0.82), 0.60),  # key light, from above
    ((-0.60, 0.55, 0.25), 0.25),  # fill, from the opposite side
    ((0.10, 0.20, -1.00), 0.12),  # weak bounce from below, so undersides are not flat
)


# +Y-up (glTF) to +Z-up (Blender) world: rotate +90 degrees about X, (x, y, z) -> (x, -z, y).
Y_UP_TO_Z_UP = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


@dataclass(frozen=True)
class RenderConfig:
    """How an object is rendered.

    Parameters
    ----------
    views
        Camera layout and image size (:class:`~gaussian_atlas.cameras.ViewConfig`).
    supersample
        Rays per pixel side; ``s * s`` stratified sub-pixel rays are
        box-filtered into each pixel (soft alpha edges). 1 = one ray per pixel.
    ambient
        Ambient light term (fraction of albedo seen everywhere).
    lights
        World-space directional lights: ``((dx, dy, dz), intensity)`` pairs,
        the direction pointing towards the light (need not be unit).
    smooth_angle_deg
        Edges with a dihedral angle below this are shaded smoothly; 0 = flat.
    n_surface_samples
        Points written to ``surface_samples.npz``.
    object_radius
        Radius of the sphere that bounds the normalised object.
    default_color
        RGB albedo of meshes without any colour information.
    """

    views: ViewConfig = field(default_factory=ViewConfig)
    supersample: int = 2
    ambient: float = 0.35
    lights: tuple[tuple[tuple[float, float, float], float], ...] = DEFAULT_LIGHTS
    smooth_angle_deg: float = 40.0
    n_surface_samples: int = 4096
    object_radius: float = 1.0
    default_color: tuple[int, int, int] = (180, 180, 180)

    def __post_init__(self) -> None:
        # accept lists (from YAML) but store tuples so the config stays hashable
        lights = tuple((tuple(float(x) for x in d), float(i)) for d, i in self.lights)
        for d, _ in lights:
            if len(d) != 3 or not np.linalg.norm(d) > 0:
                raise ValueError(f"light direction must be a non-zero 3-vector, got {d}")
        object.__setattr__(self, "lights", lights)
        object.__setattr__(self, "default_color", tuple(int(c) for c in self.default_color))
        if isinstance(self.views, Mapping):
            object.__setattr__(self, "views", ViewConfig(**self.views))
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if self.object_radius <= 0:
            raise ValueError(f"object_radius must be > 0, got {self.object_radius}")


# --------------------------------------------------------------------------- loading


def load_mesh(path: str | os.PathLike, up_axis: str | None = None) -> trimesh.Trimesh:
    """Load an OBJ / GLB / GLTF / PLY / STL (anything trimesh reads) as one mesh.

    Scenes are flattened: every mesh node is moved by its scene-graph
    transform and all are concatenated, keeping their visuals. Colour-only
    parts concatenate as they are; when any part is textured, every part's
    base colour is packed into one atlas (textures over
    :data:`MAX_PART_TEXTURE` pixels are downscaled, colour-only parts become
    palette texels of their face colours) and the result is one textured
    mesh with three vertices per face. Points, lines and empty geometry are
    dropped.

    Parameters
    ----------
    path
        The mesh file.
    up_axis
        The file's up axis, ``"y"`` or ``"z"``. ``None`` = the format's
        convention: ``"y"`` for ``.glb``/``.gltf`` (glTF is +Y up), ``"z"``
        for everything else. A +Y-up mesh is rotated +90 degrees about X
        (``(x, y, z) -> (x, -z, y)``, as Blender's glTF importer does), so the
        result is always +Z up; glTF's front (+Z) then faces -Y.

    Raises
    ------
    ValueError
        Naming the file and the reason, when it is missing, unreadable, or
        holds no triangles.
    """
    path = Path(path)
    up_axis = _resolve_up_axis(path, up_axis)
    if not path.is_file():
        raise ValueError(f"cannot load mesh {path}: file not found")
    try:
        loaded = trimesh.load(path)
    except Exception as exc:  # trimesh raises many types for bad input
        raise ValueError(f"cannot load mesh {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, trimesh.Scene):
        try:
            parts = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
        except Exception as exc:
            raise ValueError(f"cannot load mesh {path}: flattening the scene failed: {exc}") from exc
        if not parts:
            raise ValueError(f"cannot load mesh {path}: the scene holds no triangle meshes")
        mesh = _concatenate_keeping_visuals(parts, str(path))
    elif isinstance(loaded, trimesh.Trimesh):
        mesh = loaded
    else:
        raise ValueError(f"cannot load mesh {path}: got a {type(loaded).__name__}, not a triangle mesh")
    if len(mesh.faces) == 0 or len(mesh.vertices) == 0:
        raise ValueError(f"cannot load mesh {path}: it contains no triangles")
    if not np.all(np.isfinite(mesh.vertices)):
        raise ValueError(f"cannot load mesh {path}: vertices contain NaN or inf")
    if up_axis == "y":
        mesh.apply_transform(Y_UP_TO_Z_UP)
    return mesh


def _resolve_up_axis(path: Path, up_axis: str | None) -> str:
    if up_axis is None:
        return "y" if path.suffix.lower() in (".glb", ".gltf") else "z"
    if up_axis not in ("y", "z"):
        raise ValueError(f"unknown up_axis {up_axis!r}; expected 'y', 'z' or None")
    return up_axis


def _concatenate_keeping_visuals(parts: list[trimesh.Trimesh], name: str) -> trimesh.Trimesh:
    """One mesh from several parts; a shared base-colour atlas when any part is textured."""
    if len(parts) == 1:
        return parts[0]
    if not any(isinstance(p.visual, TextureVisuals) for p in parts):
        return trimesh.util.concatenate(parts)  # vertex / face colours concatenate losslessly
    # trimesh's own material packer mangles some layouts (UVs outside the atlas), so pack here:
    # every part's base colour goes into one atlas; colour-only parts become palette texels.
    default_rgb = np.asarray(RenderConfig().default_color, dtype=np.float64) / 255.0
    images, corner_uvs = zip(*(_part_texture(p, default_rgb) for p in parts))
    atlas, rects = _pack_atlas(list(images))
    big_h, big_w = atlas.shape[:2]
    uv_all = []
    for (x0, y0, w, h), uv in zip(rects, corner_uvs):  # uv: [F_i, 3, 2] in [0, 1]
        u = (x0 + uv[..., 0] * w) / big_w
        v = 1.0 - (y0 + (1.0 - uv[..., 1]) * h) / big_h
        uv_all.append(np.stack([u, v], axis=-1).reshape(-1, 2))
    # unmerged: three vertices per face, so every corner carries its own (wrapped) UV
    vertices = np.concatenate([np.asarray(p.vertices)[np.asarray(p.faces)].reshape(-1, 3) for p in parts])
    faces = np.arange(len(vertices), dtype=np.int64).reshape(-1, 3)
    from PIL import Image

    visual = TextureVisuals(uv=np.concatenate(uv_all), material=PBRMaterial(baseColorTexture=Image.fromarray(atlas)))
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


# part textures larger than this (pixels, longest side) are downscaled when parts share an atlas
MAX_PART_TEXTURE = 2048


def _part_texture(mesh: trimesh.Trimesh, default_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base colour of one part: (image ``[h, w, 3]`` uint8, per-corner UVs ``[F, 3, 2]`` in [0, 1]).

    Texture UVs are wrapped per face (shifted by the integer part of the
    face's smallest UV), which keeps repeat-tiled faces that stay within one
    tile exact; colour-only parts get a palette of their face colours
    (per-vertex gradients become per-face colours).
    """
    from PIL import Image

    faces = np.asarray(mesh.faces, dtype=np.int64)
    vis = mesh.visual
    face_rgb = None
    if isinstance(vis, TextureVisuals):
        image, factor, flat = _base_color_source(vis)
        if image is not None and vis.uv is not None and len(vis.uv) == len(mesh.vertices):
            img = image.convert("RGB")
            if max(img.size) > MAX_PART_TEXTURE:
                k = MAX_PART_TEXTURE / max(img.size)
                img = img.resize((max(1, round(img.size[0] * k)), max(1, round(img.size[1] * k))), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
            if not np.allclose(factor, 1.0):
                arr = np.round(arr * factor).astype(np.uint8)
            uv = np.asarray(vis.uv, dtype=np.float64)[faces]  # [F, 3, 2]
            uv = uv - np.floor(uv.min(axis=1, keepdims=True))
            return arr, np.clip(uv, 0.0, 1.0)
        face_rgb = np.broadcast_to(flat if flat is not None else default_rgb, (len(faces), 3))
        face_rgb = np.round(np.clip(face_rgb, 0, 1) * 255)
    elif isinstance(vis, ColorVisuals) and vis.kind is not None:
        face_rgb = np.asarray(vis.face_colors, dtype=np.float64)[:, :3]  # vertex colours averaged per face
    else:
        face_rgb = np.round(np.broadcast_to(default_rgb, (len(faces), 3)) * 255)
    palette, inverse = np.unique(face_rgb.astype(np.uint8), axis=0, return_inverse=True)
    side = int(math.ceil(math.sqrt(len(palette))))
    arr = np.zeros((side * side, 3), dtype=np.uint8)
    arr[: len(palette)] = palette
    row, col = np.divmod(inverse.reshape(-1), side)
    uv = np.stack([(col + 0.5) / side, 1.0 - (row + 0.5) / side], axis=-1)  # [F, 2] texel centres
    return arr.reshape(side, side, 3), np.repeat(uv[:, None, :], 3, axis=1)


def _pack_atlas(images: list[np.ndarray], pad: int = 1) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Shelf-pack ``[h, w, 3]`` images into one atlas, each with ``pad`` pixels of edge
    replication (no bleeding under bilinear sampling). Returns the atlas and each image's
    ``(x0, y0, w, h)`` inside it (pixels, y from the top)."""
    sizes = [(im.shape[0] + 2 * pad, im.shape[1] + 2 * pad) for im in images]
    width = max(max(w for _, w in sizes), int(math.ceil(math.sqrt(sum(h * w for h, w in sizes)))))
    order = sorted(range(len(images)), key=lambda i: -sizes[i][0])
    pos: dict[int, tuple[int, int]] = {}
    x = y = shelf_h = 0
    for i in order:
        h, w = sizes[i]
        if x + w > width:
            x, y, shelf_h = 0, y + shelf_h, 0
        pos[i] = (x, y)
        x, shelf_h = x + w, max(shelf_h, h)
    atlas = np.zeros((y + shelf_h, width, 3), dtype=np.uint8)
    rects = []
    for i, im in enumerate(images):
        px, py = pos[i]
        h, w = im.shape[:2]
        atlas[py : py + h + 2 * pad, px : px + w + 2 * pad] = np.pad(im, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        rects.append((px + pad, py + pad, w, h))
    return atlas, rects


def _base_color_source(vis: TextureVisuals) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """(PIL image or None, RGB factor [3] in [0, 1], flat RGB [3] or None) of a texture visual."""
    mat = vis.material
    if isinstance(mat, PBRMaterial):
        factor = np.ones(3)
        if mat.baseColorFactor is not None:
            factor = np.asarray(mat.baseColorFactor, dtype=np.float64)[:3] / 255.0
        if mat.baseColorTexture is not None:
            return mat.baseColorTexture, factor, None
        flat = np.ones(3) if mat.baseColorFactor is None else factor
        from trimesh.visual.color import linear_to_srgb

        return None, factor, np.clip(linear_to_srgb(flat), 0.0, 1.0)  # glTF factors are linear
    if isinstance(mat, SimpleMaterial):
        if getattr(mat, "image", None) is not None:
            # OBJ map_Kd: the image is the colour (Kd is often a placeholder), as Blender imports it
            return mat.image, np.ones(3), None
        return None, np.ones(3), np.asarray(mat.diffuse, dtype=np.float64)[:3] / 255.0
    return None, np.ones(3), None


def normalize_mesh(mesh: trimesh.Trimesh, radius: float = 1.0) -> tuple[trimesh.Trimesh, np.ndarray, float]:
    """Centre and scale a copy of ``mesh``: ``v' = (v - center) * scale``.

    ``center`` is the bounding-box centre of the vertices the faces use and
    ``scale`` puts the farthest such vertex at distance ``radius``.

    Returns
    -------
    mesh, center, scale
        The normalised copy, ``[3]`` float64 centre, float scale.
    """
    used = np.asarray(mesh.vertices)[np.unique(np.asarray(mesh.faces))]  # [U, 3]
    if len(used) == 0:
        raise ValueError("normalize_mesh: mesh has no faces")
    center = 0.5 * (used.min(axis=0) + used.max(axis=0))  # [3]
    extent = float(np.linalg.norm(used - center, axis=1).max())
    if not extent > 0 or not math.isfinite(extent):
        raise ValueError("normalize_mesh: mesh is degenerate (all vertices coincide)")
    scale = float(radius) / extent
    out = mesh.copy()
    out.apply_translation(-center)
    out.apply_scale(scale)
    return out, center, scale


# --------------------------------------------------------------------------- surface lookup


class MeshSurface:
    """Per-mesh lookups for albedo and shading normals at points given by (face, barycentric).

    Built once per mesh (texture decoded, corner normals smoothed) and
    reused for every view and for surface sampling.

    Parameters
    ----------
    mesh
        The mesh whose ``visual`` supplies the colour.
    smooth_angle_deg
        Dihedral angle below which normals are smoothed across an edge.
    default_color
        RGB used when the mesh has no colour information.
    """

    def __init__(
        self,
        mesh: trimesh.Trimesh,
        smooth_angle_deg: float = 40.0,
        default_color: Sequence[int] = (180, 180, 180),
    ) -> None:
        self.faces = np.asarray(mesh.faces, dtype=np.int64)  # [F, 3]
        self.triangles = np.asarray(mesh.triangles, dtype=np.float64)  # [F, 3, 3]
        self.corner_normals = _corner_normals(mesh, smooth_angle_deg)  # [F, 3, 3]
        self.kind = "default"
        self.flat_rgb = np.asarray(default_color, dtype=np.float64)[:3] / 255.0  # [3]
        self.texture: np.ndarray | None = None  # [Th, Tw, 3] uint8
        self.tex_factor = np.ones(3)
        self.uv: np.ndarray | None = None  # [V, 2]
        self.vertex_rgb: np.ndarray | None = None  # [V, 3] float in [0, 1]
        self.face_rgb: np.ndarray | None = None  # [F, 3] float in [0, 1]
        vis = mesh.visual
        if isinstance(vis, TextureVisuals):
            image, factor, flat = _base_color_source(vis)
            if image is not None and vis.uv is not None and len(vis.uv) == len(mesh.vertices):
                self.kind = "texture"
                self.texture = np.asarray(image.convert("RGB"), dtype=np.uint8)
                self.tex_factor = factor
                self.uv = np.asarray(vis.uv, dtype=np.float64)
            elif flat is not None:
                self.kind = "material"
                self.flat_rgb = flat
        elif isinstance(vis, ColorVisuals):
            if vis.kind == "vertex":
                self.kind = "vertex"
                self.vertex_rgb = np.asarray(vis.vertex_colors, dtype=np.float64)[:, :3] / 255.0
            elif vis.kind == "face":
                self.kind = "face"
                self.face_rgb = np.asarray(vis.face_colors, dtype=np.float64)[:, :3] / 255.0

    def albedo(self, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """Unshaded colour, ``[M, 3]`` float64 in [0, 1], at faces ``tri [M]`` and barycentrics ``bary [M, 3]``."""
        tri = np.asarray(tri, dtype=np.int64)
        if self.kind == "texture":
            uv = np.einsum("mk,mkd->md", bary, self.uv[self.faces[tri]])  # [M, 2]
            return np.clip(_bilinear_repeat(self.texture, uv) * self.tex_factor, 0.0, 1.0)
        if self.kind == "vertex":
            return np.einsum("mk,mkd->md", bary, self.vertex_rgb[self.faces[tri]])
        if self.kind == "face":
            return self.face_rgb[tri]
        return np.broadcast_to(self.flat_rgb, (len(tri), 3)).copy()

    def normals(self, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """Unit shading normals ``[M, 3]`` (smoothed, not yet flipped towards any camera)."""
        tri = np.asarray(tri, dtype=np.int64)
        n = np.einsum("mk,mkd->md", bary, self.corner_normals[tri])  # [M, 3]
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        bad = norm[:, 0] < 1e-12
        if bad.any():  # opposite corner normals cancelled: use the geometric normal
            n[bad] = _face_normals(self.triangles[tri[bad]])
            norm[bad] = np.linalg.norm(n[bad], axis=1, keepdims=True)
        return n / np.maximum(norm, 1e-12)


def _face_normals(triangles: np.ndarray) -> np.ndarray:
    n = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])  # [M, 3]
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return np.where(norm > 0, n / np.maximum(norm, 1e-300), np.array([0.0, 0.0, 1.0]))


def _bilinear_repeat(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with repeat wrapping; ``tex [Th, Tw, 3]`` uint8, ``uv [M, 2]`` (v up) -> ``[M, 3]`` in [0, 1]."""
    th, tw = tex.shape[:2]
    x = uv[:, 0] * tw - 0.5  # texel centres at (i + 0.5) / Tw
    y = (1.0 - uv[:, 1]) * th - 0.5  # image row 0 is v = 1
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    x0 = x0.astype(np.int64) % tw
    y0 = y0.astype(np.int64) % th
    x1 = (x0 + 1) % tw
    y1 = (y0 + 1) % th
    c = (
        tex[y0, x0] * ((1 - fx) * (1 - fy))
        + tex[y0, x1] * (fx * (1 - fy))
        + tex[y1, x0] * ((1 - fx) * fy)
        + tex[y1, x1] * (fx * fy)
    )  # [M, 3] float64 (uint8 texels promoted per lookup, the texture itself stays uint8)
    return c / 255.0


def _corner_normals(mesh: trimesh.Trimesh, smooth_angle_deg: float, max_degree: int = 256) -> np.ndarray:
    """``[F, 3, 3]`` normal at each face corner: area-weighted mean of the normals of the
    faces around that vertex that lie within ``smooth_angle_deg`` of this face."""
    faces = np.asarray(mesh.faces, dtype=np.int64)  # [F, 3]
    fn = _face_normals(np.asarray(mesh.triangles, dtype=np.float64))  # [F, 3]
    out = np.repeat(fn[:, None, :], 3, axis=1)  # [F, 3, 3]
    if smooth_angle_deg <= 0 or len(faces) == 0:
        return out
    # weld vertices by position: UV seams and unmerged meshes duplicate vertices, shading should not see them
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    tol = 1e-7 * max(float(np.ptp(verts, axis=0).max()), 1e-12)
    _, weld = np.unique(np.round(verts / tol), axis=0, return_inverse=True)
    faces = weld.reshape(-1)[faces]
    cos_thr = math.cos(math.radians(smooth_angle_deg))
    weighted = fn * np.asarray(mesh.area_faces, dtype=np.float64)[:, None]  # [F, 3]
    corner_v = faces.ravel()  # [3F]
    n_vert = int(corner_v.max()) + 1
    counts = np.bincount(corner_v, minlength=n_vert)  # faces around each vertex
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ring_faces = np.argsort(corner_v, kind="stable") // 3  # CSR: faces around each vertex
    flat = out.reshape(-1, 3)
    todo = np.flatnonzero(counts[corner_v] <= max_degree)  # very high-valence fans stay flat
    chunk = max(1, 4_000_000 // max(1, int(counts.max(initial=1))))
    for c0 in range(0, len(todo), chunk):
        corners = todo[c0 : c0 + chunk]  # [C]
        deg = counts[corner_v[corners]]  # [C]
        rep = np.repeat(np.arange(len(corners)), deg)  # [P] pair -> corner slot
        offs = np.arange(len(rep)) - np.repeat(np.cumsum(deg) - deg, deg)
        nbr = ring_faces[np.repeat(starts[corner_v[corners]], deg) + offs]  # [P]
        own = corners[rep] // 3  # [P]
        ok = np.einsum("pd,pd->p", fn[nbr], fn[own]) >= cos_thr
        acc = np.stack(
            [np.bincount(rep[ok], weights=weighted[nbr[ok], d], minlength=len(corners)) for d in range(3)],
            axis=1,
        )  # [C, 3]
        norm = np.linalg.norm(acc, axis=1, keepdims=True)
        good = norm[:, 0] > 1e-20
        flat[corners[good]] = acc[good] / norm[good]
    return out


# --------------------------------------------------------------------------- rays and shading


def ray_intersector(mesh: trimesh.Trimesh) -> Any:
    """trimesh's Embree ray intersector for ``mesh`` (falls back, with a warning, to the pure-Python one)."""
    try:
        import embreex  # noqa: F401
        from trimesh.ray.ray_pyembree import RayMeshIntersector
    except ImportError:
        warnings.warn(
            "embreex is not installed: falling back to trimesh's pure-Python ray_triangle "
            "intersector (much slower; it needs the rtree package)",
            RuntimeWarning,
            stacklevel=2,
        )
        from trimesh.ray.ray_triangle import RayMeshIntersector
    return RayMeshIntersector(mesh)


def first_hits(
    intersector: Any, triangles: np.ndarray, origins: np.ndarray, dirs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First intersection of each ray.

    Parameters
    ----------
    intersector
        From :func:`ray_intersector`.
    triangles
        ``[F, 3, 3]`` the mesh's triangles (for exact barycentrics).
    origins, dirs
        ``[N, 3]`` rays.

    Returns
    -------
    ray_idx, tri, bary
        ``[M]`` indices of the rays that hit, ``[M]`` face hit, ``[M, 3]``
        barycentric coordinates of the hit in that face (clipped to the triangle).
    """
    tri, ray_idx = intersector.intersects_id(origins, dirs, multiple_hits=False, return_locations=False)
    tri = np.asarray(tri, dtype=np.int64)
    ray_idx = np.asarray(ray_idx, dtype=np.int64)
    if len(tri) == 0:
        return ray_idx, tri, np.zeros((0, 3))
    # Moller-Trumbore on the face Embree reported, in float64
    v0, v1, v2 = (triangles[tri, k] for k in range(3))  # [M, 3] each
    d, o = dirs[ray_idx], origins[ray_idx]
    e1, e2 = v1 - v0, v2 - v0
    p = np.cross(d, e2)
    det = np.einsum("md,md->m", e1, p)
    inv = 1.0 / np.where(np.abs(det) > 1e-300, det, 1e-300)
    s = o - v0
    u = np.einsum("md,md->m", s, p) * inv
    v = np.einsum("md,md->m", d, np.cross(s, e1)) * inv
    bary = np.clip(np.stack([1.0 - u - v, u, v], axis=1), 0.0, None)  # [M, 3]
    total = bary.sum(axis=1, keepdims=True)
    bary = np.where(total > 0, bary / np.maximum(total, 1e-300), 1.0 / 3.0)
    return ray_idx, tri, bary


def shade_hits(
    surface: MeshSurface,
    tri: np.ndarray,
    bary: np.ndarray,
    ray_dirs: np.ndarray,
    cfg: RenderConfig,
) -> np.ndarray:
    """Lit colour at ray hits.

    Parameters
    ----------
    surface
        Lookups of the mesh that was hit (:class:`MeshSurface`).
    tri, bary
        ``[M]`` faces hit and ``[M, 3]`` barycentric coordinates.
    ray_dirs
        ``[M, 3]`` directions of the rays that hit (normals are flipped to face them).
    cfg
        ``ambient`` and world-space ``lights``.

    Returns
    -------
    np.ndarray
        ``[M, 3]`` float64 RGB in [0, 1]:
        ``clip(albedo * (ambient + sum_i I_i max(0, n . l_i)), 0, 1)``.
    """
    albedo = surface.albedo(tri, bary)  # [M, 3]
    n = surface.normals(tri, bary)  # [M, 3]
    facing = np.einsum("md,md->m", n, ray_dirs)
    n = np.where((facing > 0)[:, None], -n, n)  # towards the camera
    light = np.full(len(tri), float(cfg.ambient))  # [M]
    for direction, intensity in cfg.lights:
        l = np.asarray(direction, dtype=np.float64)
        l = l / np.linalg.norm(l)
        light += float(intensity) * np.clip(np.einsum("md,d->m", n, l), 0.0, None)
    return np.clip(albedo * light[:, None], 0.0, 1.0)


def render_views(
    mesh: trimesh.Trimesh,
    views: Sequence[Mapping[str, Any] | np.ndarray],
    intr: Mapping[str, Any],
    cfg: RenderConfig,
    progress: bool = False,
) -> np.ndarray:
    """Render ``mesh`` from each view.

    Parameters
    ----------
    mesh
        The mesh, already placed in world space (see :func:`normalize_mesh`).
    views
        Each a dict with ``"transform_matrix"`` (camera-to-world, OpenGL
        convention) or a ``[4, 4]`` matrix.
    intr
        Intrinsics (:func:`~gaussian_atlas.cameras.intrinsics`).
    cfg
        Shading and ``supersample``.
    progress
        Show a progress bar over views.

    Returns
    -------
    np.ndarray
        ``[V, H, W, 4]`` uint8 RGBA, straight alpha; RGB is 255 where alpha is 0.
    """
    intr = complete_intrinsics(intr)
    s = int(cfg.supersample)
    w, h = int(intr["w"]), int(intr["h"])
    intr_ss = dict(
        intr,
        w=w * s,
        h=h * s,
        fl_x=float(intr["fl_x"]) * s,
        fl_y=float(intr["fl_y"]) * s,
        cx=float(intr["cx"]) * s,
        cy=float(intr["cy"]) * s,
    )
    surface = MeshSurface(mesh, cfg.smooth_angle_deg, cfg.default_color)
    intersector = ray_intersector(mesh)
    out = np.empty((len(views), h, w, 4), dtype=np.uint8)
    iterator: Any = enumerate(views)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(views), desc="render", unit="view")
    for k, view in iterator:
        c2w = np.asarray(view["transform_matrix"] if isinstance(view, Mapping) else view, dtype=np.float64)
        origins, dirs = camera_rays(c2w, intr_ss)  # [h*s*w*s, 3]
        rgb = np.ones((len(dirs), 3))  # sub-pixel colours; white background
        cover = np.zeros(len(dirs))  # sub-pixel coverage, 0 or 1
        ray_idx, tri, bary = first_hits(intersector, surface.triangles, origins, dirs)
        if len(ray_idx):
            rgb[ray_idx] = shade_hits(surface, tri, bary, dirs[ray_idx], cfg)
            cover[ray_idx] = 1.0
        # box filter s x s sub-pixels; keep straight alpha
        cover = cover.reshape(h, s, w, s)
        alpha = cover.mean(axis=(1, 3))  # [h, w]
        premult = (rgb.reshape(h, s, w, s, 3) * cover[..., None]).mean(axis=(1, 3))  # [h, w, 3]
        color = np.where(alpha[..., None] > 0, premult / np.maximum(alpha[..., None], 1e-12), 1.0)
        out[k, ..., :3] = np.round(np.clip(color, 0.0, 1.0) * 255.0).astype(np.uint8)
        out[k, ..., 3] = np.round(alpha * 255.0).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- surface samples


def sample_surface(
    mesh: trimesh.Trimesh,
    n: int,
    seed: int,
    smooth_angle_deg: float = 40.0,
    default_color: Sequence[int] = (180, 180, 180),
) -> dict[str, np.ndarray]:
    """Area-uniform points on the surface with normals and unshaded albedo.

    Returns
    -------
    dict
        ``points [n, 3]`` float32, ``normals [n, 3]`` float32 (unit, the
        renderer's shading normals: smoothed below ``smooth_angle_deg``,
        oriented as the faces are wound), ``colors [n, 3]`` uint8 (albedo
        from the same lookup as the renderer, no lighting).
    """
    points, face_idx, bary = trimesh.sample.sample_surface(
        mesh, int(n), seed=int(seed), return_barycentric=True
    )
    surface = MeshSurface(mesh, smooth_angle_deg, default_color)
    face_idx = np.asarray(face_idx, dtype=np.int64)
    bary = np.asarray(bary, dtype=np.float64)
    return {
        "points": np.asarray(points, dtype=np.float32),
        "normals": surface.normals(face_idx, bary).astype(np.float32),
        "colors": np.round(np.clip(surface.albedo(face_idx, bary), 0, 1) * 255).astype(np.uint8),
    }


# --------------------------------------------------------------------------- object folders


def object_folder_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a complete render folder: ``transforms.json``,
    ``object.json``, ``surface_samples.npz`` and every image the frames list."""
    import json

    path = Path(path)
    try:
        with open(path / "transforms.json", "r", encoding="utf-8") as fh:
            meta = json.load(fh)
        frames = meta["frames"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not frames or not (path / "object.json").is_file() or not (path / "surface_samples.npz").is_file():
        return False
    return all(isinstance(f, Mapping) and (path / str(f.get("file_path", ""))).is_file() for f in frames)


def render_object_folder(
    mesh: trimesh.Trimesh,
    out_dir: str | os.PathLike,
    caption: str,
    object_id: str,
    cfg: RenderConfig,
    seed: int,
    extra_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Normalise ``mesh``, render it and write one NeRF-synthetic folder, atomically.

    Parameters
    ----------
    mesh
        The object in its own coordinates (+Z up); it is normalised here.
    out_dir
        The object folder; it appears complete or not at all (an existing
        one is replaced).
    caption, object_id
        Written to ``object.json``.
    cfg
        Views, shading, surface sample count and object radius.
    seed
        Seeds the view placement and the surface samples.
    extra_meta
        More keys for ``object.json``.

    Returns
    -------
    dict
        ``{"id", "path", "n_views", "seconds"}``.
    """
    t0 = time.perf_counter()
    norm_mesh, center, scale = normalize_mesh(mesh, cfg.object_radius)
    rng = np.random.default_rng(int(seed))
    views = place_views(cfg.views, rng)
    intr = intrinsics(cfg.views)
    images = render_views(norm_mesh, views, intr, cfg)  # [V, H, W, 4]
    samples = sample_surface(
        norm_mesh, cfg.n_surface_samples, seed=int(seed), smooth_angle_deg=cfg.smooth_angle_deg,
        default_color=cfg.default_color,
    )
    frames = []
    for k, view in enumerate(views):
        frames.append({"file_path": f"images/r_{k:03d}.png", **view})
    transforms = {**intr, "frames": frames}
    meta = {
        "id": str(object_id),
        "caption": str(caption),
        "center": [float(c) for c in center],
        "scale": float(scale),
        "object_radius": float(cfg.object_radius),
        "seed": int(seed),
        **dict(extra_meta or {}),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for k, frame in enumerate(frames):
            write_png(tmp / frame["file_path"], images[k])
        write_npz(tmp / "surface_samples.npz", **samples)
        write_json(tmp / "object.json", meta)
        write_json(tmp / "transforms.json", transforms)
    return {"id": str(object_id), "path": str(out_dir), "n_views": len(frames), "seconds": time.perf_counter() - t0}


def render_mesh_file(
    mesh_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    caption: str,
    cfg: RenderConfig | None = None,
    seed: int = 0,
    object_id: str | None = None,
    up_axis: str | None = None,
) -> dict[str, Any]:
    """Render a user's mesh file into a NeRF-synthetic folder (backs ``gatlas render-mesh``).

    Parameters
    ----------
    mesh_path
        OBJ / GLB / GLTF / PLY / STL.
    out_dir
        Output folder (see :func:`render_object_folder`).
    caption
        Text description stored in ``object.json``.
    cfg
        Render settings; defaults to ``RenderConfig()``.
    seed
        View placement and surface-sample seed.
    object_id
        Defaults to the file's stem.
    up_axis
        The file's up axis (see :func:`load_mesh`); default: glTF +Y, others +Z.

    Raises
    ------
    ValueError
        If the mesh cannot be loaded (the message names the file).
    """
    mesh_path = Path(mesh_path)
    mesh = load_mesh(mesh_path, up_axis=up_axis)
    return render_object_folder(
        mesh,
        out_dir,
        caption=caption,
        object_id=object_id if object_id is not None else mesh_path.stem,
        cfg=cfg if cfg is not None else RenderConfig(),
        seed=seed,
        extra_meta={"source": str(mesh_path), "up_axis": _resolve_up_axis(mesh_path, up_axis)},
    )
