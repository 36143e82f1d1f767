"""params.yaml is the one source of every stage setting: it sets every field of every stage config, a deleted
line is an error naming the key (not a silent class default), and derived values are derived."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from gaussian_atlas.atlas import AtlasConfig
from gaussian_atlas.config import from_dict
from gaussian_atlas.data import IngestConfig
from gaussian_atlas.evaluate import EvaluateConfig
from gaussian_atlas.normalize import NormalizeConfig
from gaussian_atlas.procedural import ProceduralConfig
from gaussian_atlas.prune import PruneCheckConfig
from gaussian_atlas.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _configs(p: dict) -> list:
    from stages.fit import fit_config
    from stages.pretrain2d import prior_train_config
    from stages.train import train_section

    atlas = {k: v for k, v in p["atlas"].items() if k not in ("batch_objects", "device")}
    return [from_dict(ProceduralConfig, p["generate"], "generate", complete=True),
            from_dict(IngestConfig, p["ingest"], "ingest", complete=True),
            fit_config(p["fit"])[0],
            from_dict(PruneCheckConfig, {**p["prune_check"], "tau": p["fit"]["tau"]}, "prune_check", complete=True),
            from_dict(AtlasConfig, atlas, "atlas", complete=True),
            from_dict(TrainConfig, train_section(p, p["atlas"]["side"]), "train", complete=True),
            prior_train_config(p),
            from_dict(EvaluateConfig, p["evaluate"], "evaluate", complete=True),
            from_dict(NormalizeConfig, p["normalize"], "normalize", complete=True)]


def test_params_set_every_field_of_every_stage_config():
    cfgs = _configs(PARAMS)
    assert cfgs[5].model.sample_size == PARAMS["atlas"]["side"]  # derived from atlas.side
    assert cfgs[3].tau == PARAMS["fit"]["tau"]  # prune_check's bound is the fit's


def test_library_fallbacks_equal_the_params():
    """The few library-level defaults kept for direct use of a function equal params.yaml's value."""
    from gaussian_atlas.normalize import DEFAULT_STD_FLOOR

    assert DEFAULT_STD_FLOOR == PARAMS["normalize"]["std_floor"]


@pytest.mark.parametrize("section, key", [("fit", "steps"), ("train", "batch_size"), ("evaluate", "samples_per_prompt"),
                                          ("generate", "seed"), ("normalize", "std_floor")])
def test_a_deleted_line_is_an_error_naming_the_key(section, key):
    p = copy.deepcopy(PARAMS)
    del p[section][key]
    with pytest.raises(ValueError, match=f"missing key.*{key}"):
        _configs(p)


def test_a_nested_deleted_line_is_named_too():
    p = copy.deepcopy(PARAMS)
    del p["generate"]["render"]["views"]["fov_deg"]
    with pytest.raises(ValueError, match=r"render\.views\.fov_deg"):
        _configs(p)


def test_sample_size_is_derived_and_a_conflicting_copy_is_refused():
    from stages.common import StageError
    from stages.train import train_section

    p = copy.deepcopy(PARAMS)
    assert "sample_size" not in p["train"]["model"]
    p["train"]["model"]["sample_size"] = p["atlas"]["side"] * 2
    with pytest.raises(StageError, match="derived from atlas.side"):
        train_section(p, p["atlas"]["side"])
