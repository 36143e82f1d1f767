"""Properties of the CPU mesh renderer: coverage, colour sources, shading, folder layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import trimesh
from PIL import Image
from trimesh.visual import TextureVisuals
from trimesh.visual.material import PBRMaterial, SimpleMaterial

from gaussian_atlas.cameras import ViewConfig, c2w_is_valid, intrinsics, look_at_c2w, place_views
from gaussian_atlas.meshrender import (
    MeshSurface,
    RenderConfig,
    load_mesh,
    normalize_mesh,
    object_folder_complete,
    render_mesh_file,
    render_object_folder,
    render_views,
    sample_surface,
    shade_hits,
)

UNLIT = RenderConfig(ambient=1.0, lights=(), supersample=1)  # colour = albedo


def _red_cube(size=1.0):
    m = trimesh.creation.box(extents=(size, size, size))
    m.visual.face_colors = [210, 30, 30, 255]
    return m


# a 2x2 quadrant texture: top-left red, top-right green, bottom-left blue, bottom-right yellow
QUADRANTS = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 0)}


def _quadrant_image(n=16):
    img = np.zeros((n, n, 3), np.uint8)
    h = n // 2
    img[:h, :h], img[:h, h:] = QUADRANTS["tl"], QUADRANTS["tr"]
    img[h:, :h], img[h:, h:] = QUADRANTS["bl"], QUADRANTS["br"]
    return Image.fromarray(img)


def _quad(visual=None):
    """Unit square in the XZ plane (y = 0) facing -Y; u along +X, v along +Z."""
    v = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], float)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    return trimesh.Trimesh(v, f, visual=visual, process=False)


QUAD_UV = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
FRONT = look_at_c2w((0.0, -3.0, 0.0))  # sees the quad face-on: image right = +X, image up = +Z
FRONT_INTR = {"w": 32, "h": 32, "camera_angle_x": 2 * math.atan(1.2 / 3.0)}  # quad spans 5/6 of the image


def _px(u, v, n=32):
    """Image pixel (row, col) showing quad texture coordinate (u, v) in the FRONT view."""
    half = n / 2 / 1.2  # pixels per world unit of the quad
    return int(n / 2 - (2 * v - 1) * half), int(n / 2 + (2 * u - 1) * half)


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("seed", [0, 1])
def test_sphere_covers_the_analytic_disc(seed):
    cfg = RenderConfig(views=ViewConfig(n_views=3, n_ring=1, resolution=48), supersample=3)
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    views = place_views(cfg.views, np.random.default_rng(seed))
    intr = intrinsics(cfg.views)
    imgs = render_views(sphere, views, intr, cfg)
    assert imgs.shape == (3, 48, 48, 4) and imgs.dtype == np.uint8
    r_px = intr["fl_x"] * math.tan(math.asin(1.0 / cfg.views.radius))
    expected = math.pi * r_px**2
    for img in imgs:
        covered = img[..., 3].astype(np.float64).sum() / 255.0
        assert covered == pytest.approx(expected, rel=0.03)
        # centred: the alpha-weighted centroid is the image centre
        a = img[..., 3].astype(np.float64)
        rows, cols = np.indices(a.shape) + 0.5
        assert (a * rows).sum() / a.sum() == pytest.approx(24.0, abs=0.3)
        assert (a * cols).sum() / a.sum() == pytest.approx(24.0, abs=0.3)


def test_background_is_white_transparent_and_edges_are_soft():
    cfg = RenderConfig(views=ViewConfig(n_views=2, n_ring=2, resolution=32), supersample=2)
    views = place_views(cfg.views, np.random.default_rng(0))
    img = render_views(_red_cube(), views, intrinsics(cfg.views), cfg)
    alpha = img[..., 3]
    assert (alpha == 0).any() and (alpha == 255).any()
    assert np.all(img[..., :3][alpha == 0] == 255)
    partial = (alpha > 0) & (alpha < 255)
    assert partial.sum() > 10  # supersampling gives fractional coverage along the silhouette
    # partially covered pixels keep the object's (straight, un-premultiplied) colour: still red
    rgb = img[..., :3][partial].astype(int)
    assert np.all(rgb[:, 0] > rgb[:, 1] + 40)
    hard = render_views(_red_cube(), views, intrinsics(cfg.views), RenderConfig(views=cfg.views, supersample=1))
    assert set(np.unique(hard[..., 3])) <= {0, 255}


def test_red_cube_renders_red():
    cfg = RenderConfig(views=ViewConfig(n_views=4, n_ring=2, resolution=32))
    img = render_views(_red_cube(), place_views(cfg.views, np.random.default_rng(1)), intrinsics(cfg.views), cfg)
    rgb = img[..., :3][img[..., 3] == 255].astype(int)
    assert len(rgb) > 100
    assert np.all(rgb[:, 0] > 2 * rgb[:, 1]) and np.all(rgb[:, 0] > 2 * rgb[:, 2])
    assert rgb[:, 0].max() > 150  # lit, not black


def test_lambert_with_a_world_light():
    """Top face: albedo * (ambient + I); vertical faces: albedo * ambient (light straight down)."""
    cube = trimesh.creation.box(extents=(1, 1, 1))
    albedo = np.array([200, 120, 40])
    cube.visual.face_colors = [*albedo, 255]
    cfg = RenderConfig(ambient=0.25, lights=(((0.0, 0.0, 1.0), 0.5),), supersample=1)
    c2w = look_at_c2w((1.6, -1.3, 1.9))
    img = render_views(cube, [c2w], {"w": 40, "h": 40, "camera_angle_x": 0.9}, cfg)[0]
    rgb = img[..., :3][img[..., 3] == 255].astype(int)
    top, side = np.round(albedo * 0.75), np.round(albedo * 0.25)
    is_top = np.all(np.abs(rgb - top) <= 1, axis=1)
    is_side = np.all(np.abs(rgb - side) <= 1, axis=1)
    assert np.all(is_top | is_side)
    assert is_top.sum() > 20 and is_side.sum() > 20


def test_shading_is_view_independent():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    surface = MeshSurface(sphere)
    rng = np.random.default_rng(0)
    tri = rng.integers(len(sphere.faces), size=50)
    bary = rng.dirichlet(np.ones(3), size=50)
    n = surface.normals(tri, bary)
    cfg = RenderConfig()
    # two different viewing directions, both looking at the front side of each point
    d1 = -n + 0.3 * np.cross(n, [0.0, 0.0, 1.0])
    d2 = -n - 0.3 * np.cross(n, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(shade_hits(surface, tri, bary, d1, cfg), shade_hits(surface, tri, bary, d2, cfg))
    # a back-facing view flips the normal: the point is lit as seen from its other side
    back = shade_hits(surface, tri, bary, n, cfg)
    assert not np.allclose(back, shade_hits(surface, tri, bary, d1, cfg))


# --------------------------------------------------------------------------- colour sources


def _textured_quad(kind):
    img = _quadrant_image()
    if kind == "pbr":
        mat = PBRMaterial(baseColorTexture=img)
    else:
        mat = SimpleMaterial(image=img, diffuse=(80, 80, 80, 255))  # map_Kd wins over Kd
    return _quad(TextureVisuals(uv=QUAD_UV, material=mat))


@pytest.mark.parametrize("kind", ["pbr", "simple"])
def test_texture_quadrants_land_where_the_uvs_say(kind):
    img = render_views(_textured_quad(kind), [FRONT], FRONT_INTR, UNLIT)[0]
    for (u, v), name in [((0.25, 0.75), "tl"), ((0.75, 0.75), "tr"), ((0.25, 0.25), "bl"), ((0.75, 0.25), "br")]:
        r, c = _px(u, v)
        np.testing.assert_allclose(img[r, c, :3], QUADRANTS[name], atol=2)


def test_textured_glb_round_trip(tmp_path):
    path = tmp_path / "quad.glb"
    _textured_quad("pbr").export(path)
    mesh = load_mesh(path, up_axis="z")
    assert isinstance(mesh.visual, TextureVisuals)
    img = render_views(mesh, [FRONT], FRONT_INTR, UNLIT)[0]
    for (u, v), name in [((0.25, 0.75), "tl"), ((0.75, 0.25), "br")]:
        r, c = _px(u, v)
        np.testing.assert_allclose(img[r, c, :3], QUADRANTS[name], atol=3)


def test_glb_is_converted_from_y_up(tmp_path):
    """glTF is +Y up: the loader turns +Y into +Z (and +Z into -Y), like Blender."""
    cone = trimesh.creation.cone(radius=0.3, height=2.0)  # apex at +Z ...
    cone.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))  # ... now at +Y
    path = tmp_path / "cone.glb"
    cone.export(path)
    loaded = load_mesh(path)
    top = loaded.vertices[np.argmax(loaded.vertices[:, 2])]
    np.testing.assert_allclose(top, [0, 0, 2.0], atol=1e-6)
    np.testing.assert_allclose(load_mesh(path, up_axis="z").bounds[1, 1], 2.0, atol=1e-6)


def test_vertex_colours_interpolate():
    colors = np.array([[255, 0, 0, 255], [0, 0, 255, 255], [0, 0, 255, 255], [255, 0, 0, 255]], np.uint8)
    quad = _quad()
    quad.visual.vertex_colors = colors  # left edge red, right edge blue
    img = render_views(quad, [FRONT], FRONT_INTR, UNLIT)[0]
    row = img[16, _px(0.03, 0.5)[1] : _px(0.97, 0.5)[1] + 1, :3].astype(int)
    assert np.all(np.diff(row[:, 0]) <= 0) and np.all(np.diff(row[:, 2]) >= 0)
    assert row[0, 0] > 230 and row[-1, 2] > 230
    np.testing.assert_allclose(img[16, 16, :3], [128, 0, 128], atol=12)


def test_face_colours_and_default_grey():
    quad = _quad()
    quad.visual.face_colors = np.array([[0, 200, 0, 255], [200, 0, 200, 255]], np.uint8)
    img = render_views(quad, [FRONT], FRONT_INTR, UNLIT)[0]
    # face 0 = (0, 1, 2) is the lower-right triangle, face 1 the upper-left
    np.testing.assert_array_equal(img[_px(0.8, 0.2)][:3], [0, 200, 0])
    np.testing.assert_array_equal(img[_px(0.2, 0.8)][:3], [200, 0, 200])
    plain = _quad()
    img = render_views(plain, [FRONT], FRONT_INTR, RenderConfig(ambient=1.0, lights=(), default_color=(90, 91, 92)))[0]
    np.testing.assert_array_equal(img[16, 16, :3], [90, 91, 92])


def test_scene_with_mixed_visuals_keeps_colours(tmp_path):
    box = trimesh.creation.box(extents=(1, 1, 1))
    tex = np.full((4, 4, 3), (230, 20, 20), np.uint8)
    box.visual = TextureVisuals(uv=np.random.default_rng(0).random((len(box.vertices), 2)),
                                material=PBRMaterial(baseColorTexture=Image.fromarray(tex)))
    ball = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    ball.visual.face_colors = [20, 20, 230, 255]
    scene = trimesh.Scene()
    scene.add_geometry(box)
    scene.add_geometry(ball, transform=trimesh.transformations.translation_matrix([3.0, 0.0, 0.0]))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path, up_axis="z")
    assert len(mesh.faces) == len(box.faces) + len(ball.faces)
    surface = MeshSurface(mesh)
    centroids = mesh.triangles_center
    albedo = surface.albedo(np.arange(len(mesh.faces)), np.full((len(mesh.faces), 3), 1 / 3))
    on_ball = centroids[:, 0] > 2.0  # the scene transform was applied
    assert on_ball.sum() == len(ball.faces)
    assert np.all(albedo[on_ball, 2] > 0.8) and np.all(albedo[on_ball, 0] < 0.2)
    assert np.all(albedo[~on_ball, 0] > 0.8) and np.all(albedo[~on_ball, 2] < 0.2)


def test_scene_atlas_keeps_tiled_textures_in_place(tmp_path):
    """Two materials packed into one atlas; the quad's UVs sit in the tile [2, 3] (repeat wrap)."""
    quad = _quad(TextureVisuals(uv=QUAD_UV + 2.0, material=PBRMaterial(baseColorTexture=_quadrant_image())))
    other = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    other.visual = TextureVisuals(uv=np.zeros((8, 2)),
                                  material=PBRMaterial(baseColorTexture=Image.new("RGB", (32, 8), (9, 9, 9))))
    scene = trimesh.Scene()
    scene.add_geometry(other, transform=trimesh.transformations.translation_matrix([0.0, 5.0, 0.0]))
    scene.add_geometry(quad)
    path = tmp_path / "two.glb"
    scene.export(path)
    mesh = load_mesh(path, up_axis="z")
    img = render_views(mesh, [FRONT], FRONT_INTR, UNLIT)[0]
    for (u, v), name in [((0.25, 0.75), "tl"), ((0.75, 0.75), "tr"), ((0.25, 0.25), "bl"), ((0.75, 0.25), "br")]:
        np.testing.assert_allclose(img[_px(u, v)][:3], QUADRANTS[name], atol=3)


# --------------------------------------------------------------------------- samples, normalisation


def test_surface_samples_lie_on_the_box_with_its_normals_and_colours():
    box = trimesh.creation.box(extents=(2, 2, 2))
    box.visual.face_colors = [10, 200, 30, 255]
    s = sample_surface(box, 500, seed=0)
    assert s["points"].shape == s["normals"].shape == (500, 3) and s["colors"].shape == (500, 3)
    assert s["points"].dtype == s["normals"].dtype == np.float32 and s["colors"].dtype == np.uint8
    p = s["points"].astype(np.float64)
    np.testing.assert_allclose(np.abs(p).max(axis=1), 1.0, atol=1e-6)  # on the surface
    np.testing.assert_allclose(np.linalg.norm(s["normals"], axis=1), 1.0, atol=1e-6)
    axis = np.argmax(np.abs(p), axis=1)
    expected = np.zeros_like(p)
    expected[np.arange(500), axis] = np.sign(p[np.arange(500), axis])
    inside = np.sort(np.abs(p), axis=1)[:, 1] < 0.999  # away from edges
    np.testing.assert_allclose(s["normals"][inside], expected[inside], atol=1e-6)  # outward face normals
    assert np.all(s["colors"] == [10, 200, 30])
    again = sample_surface(box, 500, seed=0)
    np.testing.assert_array_equal(again["points"], s["points"])


def test_surface_samples_of_a_sphere_have_radial_smooth_normals():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    s = sample_surface(sphere, 300, seed=1)
    r = np.linalg.norm(s["points"], axis=1)
    assert np.all((r <= 1.0 + 1e-6) & (r > 0.98))
    radial = s["points"] / r[:, None]
    assert np.all(np.einsum("nd,nd->n", radial, s["normals"]) > 0.999)


def test_normalize_mesh_centres_and_scales():
    mesh = trimesh.creation.box(extents=(2.0, 1.0, 4.0))
    mesh.apply_translation([5.0, -3.0, 1.0])
    out, center, scale = normalize_mesh(mesh, radius=1.5)
    np.testing.assert_allclose(center, [5.0, -3.0, 1.0])
    np.testing.assert_allclose(out.bounds.mean(axis=0), 0.0, atol=1e-12)
    assert np.linalg.norm(out.vertices, axis=1).max() == pytest.approx(1.5)
    np.testing.assert_allclose(out.vertices / scale + center, mesh.vertices, atol=1e-12)
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), [5.0, -3.0, 1.0])  # input untouched


# --------------------------------------------------------------------------- loading errors, folders


def test_load_mesh_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.glb"
    with pytest.raises(ValueError, match="nope.glb"):
        load_mesh(missing)
    junk = tmp_path / "broken.obj"
    junk.write_text("this is not a mesh\nf 1 2 3\n")
    with pytest.raises(ValueError, match="broken.obj"):
        load_mesh(junk)
    garbage = tmp_path / "garbage.glb"
    garbage.write_bytes(b"\x00\x01 definitely not gltf")
    with pytest.raises(ValueError, match="garbage.glb"):
        load_mesh(garbage)
    with pytest.raises(ValueError, match="broken.obj"):
        render_mesh_file(junk, tmp_path / "out", caption="x")
    assert not (tmp_path / "out").exists()


def test_render_object_folder_layout_and_consistent_poses(tmp_path):
    cfg = RenderConfig(views=ViewConfig(n_views=4, n_ring=2, resolution=32), n_surface_samples=200)
    mesh = trimesh.creation.cone(radius=0.8, height=1.5)
    mesh.apply_translation([10.0, 0.0, 0.0])  # off-centre: normalisation must be recorded
    out = tmp_path / "obj"
    info = render_object_folder(mesh, out, "a grey cone", "cone-1", cfg, seed=3, extra_meta={"parts": [1]})
    assert info["n_views"] == 4 and object_folder_complete(out)
    tf = json.loads((out / "transforms.json").read_text())
    assert set(intrinsics(cfg.views)) <= set(tf)
    assert [f["file_path"] for f in tf["frames"]] == [f"images/r_{k:03d}.png" for k in range(4)]
    meta = json.loads((out / "object.json").read_text())
    assert meta["id"] == "cone-1" and meta["caption"] == "a grey cone" and meta["seed"] == 3
    assert meta["parts"] == [1] and meta["object_radius"] == 1.0
    np.testing.assert_allclose(meta["center"], mesh.bounds.mean(axis=0))
    samples = np.load(out / "surface_samples.npz")
    pts = samples["points"].astype(np.float64)
    assert pts.shape == (200, 3) and np.linalg.norm(pts, axis=1).max() <= 1.0 + 1e-5
    # every surface point projects inside the rendered silhouette of every view
    for frame in tf["frames"]:
        img = np.asarray(Image.open(out / frame["file_path"]))
        assert img.shape == (32, 32, 4)
        c2w = np.asarray(frame["transform_matrix"])
        assert c2w_is_valid(c2w)[0]
        w2c = np.linalg.inv(c2w)
        pc = pts @ w2c[:3, :3].T + w2c[:3, 3]
        u = tf["fl_x"] * pc[:, 0] / -pc[:, 2] + tf["cx"]
        v = -tf["fl_y"] * pc[:, 1] / -pc[:, 2] + tf["cy"]
        # (a point on the silhouette may land in a pixel its sub-pixel rays just miss: allow one pixel)
        grown = np.pad(img[..., 3], 1)
        grown = np.max([grown[1 + dr : 33 + dr, 1 + dc : 33 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
        assert np.all(grown[v.astype(int), u.astype(int)] > 0)
        assert (img[v.astype(int), u.astype(int), 3] > 0).mean() > 0.95
        assert img[0, :, 3].max() == img[-1, :, 3].max() == img[:, 0, 3].max() == img[:, -1, 3].max() == 0


def test_render_mesh_file(tmp_path):
    path = tmp_path / "cube.ply"
    _red_cube().export(path)
    cfg = RenderConfig(views=ViewConfig(n_views=2, n_ring=1, resolution=16), n_surface_samples=32)
    render_mesh_file(path, tmp_path / "out", caption="a red cube", cfg=cfg, seed=1)
    meta = json.loads((tmp_path / "out" / "object.json").read_text())
    assert meta["id"] == "cube" and meta["source"] == str(path) and meta["up_axis"] == "z"
    img = np.asarray(Image.open(tmp_path / "out" / "images" / "r_000.png"))
    rgb = img[..., :3][img[..., 3] == 255].astype(int)
    assert len(rgb) and np.all(rgb[:, 0] > 2 * rgb[:, 1])  # PLY face colours survived
