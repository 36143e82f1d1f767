"""The registered model takes what a user passes (issue #16 item 6): registered by the train stage's
``register_model`` into an MLflow sqlite store, loaded back from the registry, it predicts from a list of prompts,
one prompt or a DataFrame with a ``prompt`` column; its params (``out_dir``, ``steps``, ``guidance``, ``seed``)
are honoured, not dropped with a warning, and default to ``params.yaml: evaluate.sample``; a failed call leaves
no folder behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def registered(tiny_model_dir, tmp_path_factory):
    """The tiny model registered as ``tiny-atlas`` by ``stages.common.register_model``, loaded from the registry."""
    import mlflow

    from stages.common import register_model
    from stages.train import sample_config

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            register_model(tiny_model_dir, "tiny-atlas", sample_config(PARAMS))
        yield mlflow.pyfunc.load_model("models:/tiny-atlas/latest")
    finally:
        mlflow.set_tracking_uri(old)


def _read(path):
    from gaussian_atlas.gaussians import read_ply

    return read_ply(path)


def test_the_registered_model_predicts_from_a_list_a_prompt_or_a_dataframe_with_its_params(registered, tmp_path):
    m = registered
    sample = PARAMS["evaluate"]["sample"]
    schema = {p.name: p.default for p in m.metadata.get_params_schema().params}
    assert schema == {"out_dir": "", "steps": sample["steps"], "guidance": sample["guidance"],
                      "batch_size": sample["batch_size"], "seed": sample["seed"]}  # defaults: evaluate.sample

    # a list of prompts; the params are honoured: files in out_dir, the steps and seeds used recorded per row
    out = tmp_path / "list"
    rows = m.predict(["a red cube", "a blue sphere"], params={"out_dir": str(out), "steps": 2, "seed": 5})
    assert list(rows.columns) == ["prompt", "seed", "ply", "steps", "guidance"]
    assert rows["prompt"].tolist() == ["a red cube", "a blue sphere"] and rows["seed"].tolist() == [5, 6]
    assert rows["steps"].tolist() == [2, 2] and rows["guidance"].tolist() == [sample["guidance"]] * 2
    assert sorted(Path(p).parent for p in rows["ply"]) == [out, out]
    assert sorted(p.name for p in out.iterdir()) == ["000_a_red_cube.ply", "001_a_blue_sphere.ply"]

    # a DataFrame with a seed per row: the same prompt and seed as row 0 above is the same object
    df_rows = m.predict(pd.DataFrame({"prompt": ["a red cube"], "seed": [5]}),
                        params={"out_dir": str(tmp_path / "df"), "steps": 2})
    assert df_rows["seed"].tolist() == [5] and Path(df_rows["ply"][0]).parent == tmp_path / "df"
    a, b = _read(rows["ply"][0]), _read(df_rows["ply"][0])
    assert np.allclose(a.means.numpy(), b.means.numpy(), atol=1e-4)

    # steps change the sample: they reach the sampler, they are not only recorded
    one = m.predict("a red cube", params={"out_dir": str(tmp_path / "one"), "steps": 1, "seed": 5})
    assert one["steps"].tolist() == [1] and len(one) == 1
    assert not np.allclose(_read(one["ply"][0]).means.numpy(), a.means.numpy(), atol=1e-4)

    # no out_dir: a fresh temporary folder; no steps: evaluate.sample.steps
    tmp_rows = m.predict(["a red cube"])
    assert tmp_rows["steps"].tolist() == [sample["steps"]] and Path(tmp_rows["ply"][0]).exists()
    assert tmp_rows["seed"].tolist() == [sample["seed"]]


def test_the_registered_model_refuses_what_it_cannot_read_naming_it(registered, tmp_path):
    with pytest.raises(ValueError, match=r"'prompt' column; got columns \['text'\]"):
        registered.predict(pd.DataFrame({"text": ["a red cube"]}), params={"out_dir": str(tmp_path / "x")})
    with pytest.raises(TypeError, match=r"a list of prompts.*got int"):
        registered.predict(42, params={"out_dir": str(tmp_path / "x")})
    with pytest.raises(ValueError, match="every prompt must be a string; got int"):
        registered.predict(["a red cube", 3], params={"out_dir": str(tmp_path / "x")})
    assert not (tmp_path / "x").exists()


def test_prompts_and_seeds_reads_lists_strings_frames_and_records():
    from gaussian_atlas.atlas_pyfunc import prompts_and_seeds

    assert prompts_and_seeds("a red cube") == (["a red cube"], [None])
    assert prompts_and_seeds(["a", "b"]) == (["a", "b"], [None, None])
    assert prompts_and_seeds(np.array(["a", "b"])) == (["a", "b"], [None, None])
    assert prompts_and_seeds(pd.DataFrame({"prompt": ["a", "b"], "seed": [3.0, np.nan]})) == (["a", "b"], [3, None])
    assert prompts_and_seeds({"prompt": ["a", "b"], "seed": [1, 2]}) == (["a", "b"], [1, 2])
    assert prompts_and_seeds([{"prompt": "a", "seed": 4}]) == (["a"], [4])
    with pytest.raises(ValueError, match="no prompts"):
        prompts_and_seeds([])
    with pytest.raises(ValueError, match="seed must be an integer; got str"):
        prompts_and_seeds(pd.DataFrame({"prompt": ["a"], "seed": ["x"]}))


def test_a_failed_call_leaves_no_folder_and_no_files(tiny_model_dir, tmp_path, monkeypatch):
    import tempfile

    import gaussian_atlas.gaussians as gaussians
    from gaussian_atlas import atlas_pyfunc

    model = atlas_pyfunc.load(tiny_model_dir)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(ValueError, match="steps must be >= 1"):  # refused before anything is written
        atlas_pyfunc.predict(model, ["a red cube"], {"steps": 0})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        atlas_pyfunc.predict(model, ["a red cube"], {"steps": 0, "out_dir": str(tmp_path / "never")})
    assert list(temp.iterdir()) == [] and not (tmp_path / "never").exists()

    real = gaussians.write_ply
    calls = []

    def fail_second(path, g):  # the disk fills up after the first PLY
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, g)

    monkeypatch.setattr(gaussians, "write_ply", fail_second)
    with pytest.raises(OSError, match="disk full"):  # a temporary folder it made: removed
        atlas_pyfunc.predict(model, ["a red cube", "a blue sphere"], {"steps": 1})
    assert list(temp.iterdir()) == []
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):  # the user's folder: kept, without this call's PLYs
        atlas_pyfunc.predict(model, ["a red cube", "a blue sphere"], {"steps": 1, "out_dir": str(keep)})
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]

    monkeypatch.setattr(gaussians, "write_ply", real)
    rows = atlas_pyfunc.predict(model, ["a red cube"], {"steps": 1})
    assert [p.parent for p in temp.iterdir()] == [temp] and Path(rows["ply"][0]).parent.parent == temp
