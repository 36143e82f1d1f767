"""The generate + ingest stages through DVC and the Prefect flow, on a tiny copy of the project.

One copy of the repository (tracked files) per test session, with tiny params,
its own git repo, and its own MLflow sqlite store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = {
    "generate": {"n_objects": 4, "composition_fraction": 0.25, "seed": 0, "workers": 1,
                 "holdout": {"singles": 1, "compositions": 0, "ceiling_per_prompt": 1},
                 "render": {"supersample": 1, "n_surface_samples": 256,
                            "views": {"n_views": 8, "n_ring": 6, "resolution": 32}}},
    "ingest": {"min_views": 4, "workers": 2},
    "fit": {"steps": 30, "tau": 300, "init_points": 200, "resolution": 32, "views_per_step": 2, "workers": 1,
            "measure_views": 2, "holdout_every": 4,
            "densify": {"refine_start_iter": 10, "refine_every": 10, "refine_stop_iter": 25}},
    "prune_check": {"psnr_floor": 5.0},
    "atlas": {"side": 16, "method": "scipy", "grid": None},  # the shipped demo model is 64x64: from config here
    "train": {"model": {"max_length": 16, "pretrained": None}, "steps": 3, "batch_size": 2, "checkpoint_every": 2,
              "render_resolution": 16, "sample_every": 2, "sample_steps": 2, "sample_views": 2,
              "sample_resolution": 16},
    "pretrain2d": {"enabled": True, "data": {"n_objects": 4, "views": 2, "supersample": 1, "workers": 1}, "steps": 2,
                   "batch_size": 2,
                   "checkpoint_every": 2},
    "evaluate": {"n_seen": 2, "n_held_out": 1, "n_compositions": 1, "n_views": 2, "resolution": 24,
                 "samples_per_prompt": 2, "n_bootstrap": 200,
                 "shape_points": 256, "rotations": 8, "sample": {"steps": 2, "frames": 3, "resolution": 24}},
}
STAGES = ["generate", "ingest", "fit", "prune_check", "atlas", "normalize", "pretrain2d", "train", "evaluate"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("proj")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(("data/", "metrics/", "reports/")) and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    _git(dst, "init", "-q")
    _git(dst, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(dst, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny project")
    return dst


@pytest.fixture(scope="session")
def tracking(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _env() -> dict:
    env = dict(os.environ)
    env.pop("GATLAS_MLFLOW_PARENT_RUN_ID", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=project, env=_env(),
                          capture_output=True, text=True)


def test_flow_runs_stages_under_one_parent_run_then_is_a_noop(project, tracking, prefect_harness, monkeypatch):
    import mlflow

    monkeypatch.setenv("PATH", _env()["PATH"])
    from flows.pipeline import pipeline

    result = pipeline(root=str(project))
    assert result["stages"] == {s: "ran" for s in STAGES}
    assert (project / "data/ingested/manifest.parquet").exists()
    assert (project / "reports/ingest/data_docs/index.html").exists()

    client = mlflow.MlflowClient(tracking)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["gatlas.stage"] == "pipeline"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["gatlas.stage"]: r for r in children}
    assert set(by_stage) == set(STAGES)
    ing = by_stage["ingest"]
    assert ing.info.status == "FINISHED"
    assert ing.data.metrics["n_accepted"] == 5 and ing.data.metrics["n_quarantined"] == 0  # 4 training + 1 ceiling
    assert ing.data.params["min_views"] == "4"
    assert len(ing.data.tags["mlflow.source.git.commit"]) >= 40
    arts = {a.path for a in client.list_artifacts(ing.info.run_id)}
    assert {"contact_sheet.png", "manifest.parquet", "quarantine.csv", "data_docs"} <= arts
    assert "contact_sheet.png" in {a.path for a in client.list_artifacts(by_stage["generate"].info.run_id)}

    fit = by_stage["fit"]
    assert fit.data.metrics["n_ok"] == 5 and fit.data.metrics["n_gaussians_max"] <= 300  # 4 training + 1 ceiling
    assert {"metrics.parquet", "histograms.png", "fits_vs_gt.png"} <= {a.path for a in client.list_artifacts(fit.info.run_id)}
    import pandas as pd
    acc = pd.read_csv(project / "data/prune_check/accepted.csv")
    assert len(acc) == 5 and (acc["n_gaussians"] <= 300).all()
    from gaussian_atlas.gaussians import read_ply
    g = read_ply(project / "data/fits" / acc["ply"][0])
    assert 0 < len(g) <= 300

    index = pd.read_parquet(project / "data/atlas/index.parquet")
    assert len(index) == 5 and set(index["caption"]) <= {c for c in index["caption"] if c}
    # the held-out prompt's ceiling object: in the index, never a training caption
    held = index[index["split"] == "ceiling"]
    assert len(held) == 1 and held["caption"].iloc[0] not in set(index.loc[index["split"] == "train", "caption"])
    import numpy as np
    with np.load(project / "data/atlas" / index["path"][0]) as z:
        assert z["atlas"].shape == (16, 16, 16) and np.isfinite(z["atlas"]).all()
    with np.load(project / "data/normalize/stats.npz") as z:
        assert int(z["count"]) == 4 and (z["std"] > 0).all()  # statistics of the training split only
    assert "atlas_channels" in {a.path for a in client.list_artifacts(by_stage["atlas"].info.run_id)}
    model = project / "models/atlas-unet/model"
    assert {"unet", "text_encoder", "tokenizer", "scheduler", "stats.npz", "sphere2grid.npy"} <= \
        {p.name for p in model.iterdir()}
    tr = by_stage["train"]
    assert len(client.get_metric_history(tr.info.run_id, "loss_v")) == 3

    import json
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    assert ev["n_prompts"] == 4 and ev["n_single_held_out"] == 1 and ev["n_compositions"] == 1
    for src in ("generated", "ceiling", "floor"):
        assert {"colour_accuracy", "shape_accuracy", "both_accuracy", "colour_distance", "chamfer"} <= set(ev[src])
    assert ev["samples_per_prompt"] == 2 and ev["generated"]["n"] == 8
    assert ev["ceiling"]["held_out_singles"]["n"] == 2  # the held-out prompt's ceiling: its own object, per sample
    assert ev["generated"]["held_out"]["n_prompts"] >= 1 and ev["generated"]["seen"]["n_prompts"] >= 2
    lo, hi = ev["generated"]["seen"]["both_accuracy_ci95"]
    assert 0.0 <= lo <= ev["generated"]["seen"]["both_accuracy"] <= hi <= 1.0
    assert ev["generated"]["held_out_singles"]["n"] == 2
    assert held["caption"].iloc[0] in {p for p in [json.loads(x)["prompt"] for x in
                                                 (project / "data/evaluate/prompts.jsonl").read_text().splitlines()]}
    prior = project / "models/prior2d/model"
    assert {"unet", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in prior.iterdir()}
    assert (project / "reports/pretrain2d/samples.png").exists()
    assert ev["clip_score"] == {"status": "skipped", "reason": "no weights configured (evaluate.clip_model is null)"}
    assert ev["vqa_score"]["status"] == "skipped"
    out = project / "data/evaluate"
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and sum(p["held_out"] for p in prompts) >= 1
    for p in prompts:
        assert len(read_ply(out / "plys" / f"{p['file']}.ply")) == 16 * 16
        assert (out / "turntables" / f"{p['file']}.gif").exists() and (out / "atlases" / f"{p['file']}.png").exists()
    scores = pd.read_parquet(out / "scores.parquet")
    assert set(scores["source"]) == {"generated", "ceiling", "floor"} and (scores["source"] == "generated").sum() == 8
    gallery = (out / "gallery.html").read_text()
    assert all(p["prompt"] in gallery for p in prompts) and "src='data:image/gif;base64," in gallery
    assert (project / "reports/evaluate/accuracy.csv").exists()
    er = by_stage["evaluate"]
    assert 0.0 <= er.data.metrics["generated.colour_accuracy"] <= 1.0
    arts = {a.path for a in client.list_artifacts(er.info.run_id)}
    assert {"turntables", "gallery", "scores.parquet", "evaluate.json"} <= arts
    assert "gallery/gallery.html" in {a.path for a in client.list_artifacts(er.info.run_id, "gallery")}
    previews = {a.path for a in client.list_artifacts(tr.info.run_id, "samples")}
    assert previews == {"samples/step_000002.png", "samples/step_000003.png"}
    versions = client.search_model_versions("name = 'gaussian-atlas-unet'")
    assert versions and versions[0].run_id == tr.info.run_id

    again = pipeline(root=str(project))
    assert again["stages"] == {s: "up to date" for s in STAGES}


def test_stage_alone_opens_its_own_run_and_quarantine_gate_fails_in_one_line(project, tracking,
                                                                              prefect_harness):
    import mlflow

    if not (project / "dvc.lock").exists():  # also runnable alone
        assert _dvc(project, "repro").returncode == 0
    proc = _dvc(project, "repro", "--force", "--single-item", "ingest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("gaussian-atlas")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`gatlas.invoked_by` = 'dvc'",
                              order_by=["attributes.start_time DESC"])
    assert runs and runs[0].data.tags["gatlas.stage"] == "ingest"
    assert "mlflow.parentRunId" not in runs[0].data.tags

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["min_views"] = 99  # every object now has too few views
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.ingest"], cwd=project, env=_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 1
        err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "quarantined" in err[0] and "Traceback" not in proc.stderr
        q = (project / "data/ingested/quarantine.csv").read_text()
        assert q.count("only 8 views (at least 99 needed)") == 5  # 4 training + 1 ceiling object
    finally:
        params["ingest"]["min_views"] = 4
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_wrong_dataset_path_is_one_line_error(project, tracking):
    params = yaml.safe_load((project / "params.yaml").read_text())
    alt = project / "params_wrong.yaml"
    params["ingest"]["source"] = "does/not/exist"
    alt.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.ingest", "--params", str(alt), "--out", "tmp_out"],
                          cwd=project, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: dataset path does not exist: does/not/exist"
    assert "Traceback" not in proc.stderr


def test_repro_rebuilds_what_a_change_reaches_and_nothing_stale(project, tracking, prefect_harness):
    """`dvc status` sees an edited library file in every stage; after `fit.steps` changes, `dvc repro` rebuilds
    every atlas from the new fits, the statistics and the model (not a resume of the old checkpoints)."""
    import hashlib
    import json

    import numpy as np
    import pandas as pd

    from gaussian_atlas.atlas import AtlasConfig, atlas_stamp, input_stamp

    proc = _dvc(project, "repro")  # earlier tests ran stages alone: back to a consistent state
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(_dvc(project, "status", "--json").stdout or "{}") == {}
    lib = project / "src/gaussian_atlas/viz.py"
    orig = lib.read_text()
    lib.write_text(orig + "\n# an edit\n")
    try:
        changed = json.loads(_dvc(project, "status", "--json").stdout)
        assert set(changed) == set(STAGES), changed
    finally:
        lib.write_text(orig)
    assert json.loads(_dvc(project, "status", "--json").stdout or "{}") == {}

    def snapshot():
        index = pd.read_parquet(project / "data/atlas/index.parquet")
        stamps = {}
        for r in index.itertuples(index=False):
            with np.load(project / "data/atlas" / r.path) as z:
                stamps[r.id] = str(z["stamp"])
        digest = lambda p: hashlib.sha256((project / p).read_bytes()).hexdigest()  # noqa: E731
        return stamps, digest("data/normalize/stats.npz"), digest(
            "models/atlas-unet/model/unet/diffusion_pytorch_model.safetensors")

    stamps0, stats0, unet0 = snapshot()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["fit"]["steps"] = 25
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = _dvc(project, "repro")
        assert proc.returncode == 0, proc.stderr[-2000:]
        stamps1, stats1, unet1 = snapshot()
        assert set(stamps1) == set(stamps0) and all(stamps1[k] != stamps0[k] for k in stamps0)
        acfg = AtlasConfig(**{k: v for k, v in params["atlas"].items() if k not in ("batch_objects", "device")})
        fits = pd.read_csv(project / "data/prune_check/accepted.csv")
        for r in fits.itertuples(index=False):  # each atlas is keyed by the bytes of the current fit
            assert stamps1[r.id] == input_stamp(atlas_stamp(acfg), project / "data/fits" / r.ply)
        assert stats1 != stats0 and unet1 != unet0
        assert json.loads((project / "metrics/train.json").read_text())["step"] == 3
    finally:
        params["fit"]["steps"] = 30
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
