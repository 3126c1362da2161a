"""One config tree: profiles merge over defaults, overrides reach any key, bad keys fail by name."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from psamf.config import Config, load_config
from psamf.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_profiles_merge_over_defaults():
    demo, smoke, paper = (load_config("params.yaml", p) for p in ("demo", "smoke", "paper"))
    assert demo.profile == "demo" and smoke.profile == "smoke"
    assert smoke.mult.d_model < demo.mult.d_model
    assert smoke.data.audio_dim == demo.data.audio_dim == 74  # untouched keys keep the default
    assert paper.data.corpus == "mosi" and paper.mult.n_layers == 5 and paper.mult.n_heads == 10
    assert paper.pretrain.epochs == 40 and paper.pretrain.lr == 1e-3


def test_params_yaml_covers_every_config_key():
    """params.yaml is the single source: every dataclass field appears there, nothing extra."""
    raw = yaml.safe_load(open("params.yaml"))
    raw.pop("profiles")
    from psamf.config import flatten
    assert set(flatten(raw)) == set(Config().flat())


def test_overrides_reach_any_key_and_are_typed():
    cfg = load_config("params.yaml", "smoke", ["mult.causal_mask=false", "psamf.tau=0.2",
                                               "synth.split=[0.5, 0.25, 0.25]", "data.mosi_dir=/x"])
    assert cfg.mult.causal_mask is False and cfg.psamf.tau == 0.2
    assert cfg.synth.split == [0.5, 0.25, 0.25] and cfg.data.mosi_dir == "/x"
    assert load_config("params.yaml", None, ["profile=smoke"]).profile == "smoke"
    assert load_config("params.yaml", None, ["pretrain.lr=1"]).pretrain.lr == 1.0  # int -> float
    assert load_config("params.yaml", None, ["train.lr_head=3e-3"]).train.lr_head == 0.003  # YAML 1.1 str


@pytest.mark.parametrize("override, message", [
    ("mult.nope=1", "unknown key(s) mult.nope"),
    ("mult.d_model=abc", "mult.d_model must be int"),
    ("train.lr=fast", "train.lr must be float"),
    ("mult.causal_mask=1", "mult.causal_mask must be true/false"),
    ("novalue", "is not KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("params.yaml", "smoke", [override])


def test_unknown_profile_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="unknown profile 'fast'"):
        load_config("params.yaml", "fast")
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match=str(bad)):
        load_config(bad)


def test_cli_prints_resolved_config_with_overrides():
    out = subprocess.run([sys.executable, "-m", "psamf.cli", "config", "--profile", "smoke",
                          "--set", "mult.n_heads=4"], capture_output=True, text=True, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["profile"] == "smoke" and cfg["mult"]["n_heads"] == 4


def test_dataclass_defaults_equal_the_params_file_values():
    """One source of truth: with no params.yaml (a bare pod, a library user) the config is the
    same as params.yaml's top-level sections, value for value, not only key for key."""
    import dataclasses

    import yaml

    from psamf.config import Config, flatten

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.pop("profiles"), raw.pop("profile")
    defaults = flatten(dataclasses.asdict(Config()))
    defaults.pop("profile")
    assert defaults == flatten(raw)


def test_a_saved_model_without_newer_keys_loads_as_it_was_trained():
    from psamf.config import SAVED_PSAMF_DEFAULTS, PsamfConfig, saved_psamf_config

    old = saved_psamf_config({"tau": 0.2, "split_layer": 3, "from_a_newer_psamf": 1})
    assert old.tau == 0.2 and old.split_layer == 3
    assert {k: getattr(old, k) for k in SAVED_PSAMF_DEFAULTS} == SAVED_PSAMF_DEFAULTS
    assert SAVED_PSAMF_DEFAULTS != {k: getattr(PsamfConfig(), k) for k in SAVED_PSAMF_DEFAULTS}
    import dataclasses

    assert saved_psamf_config(dataclasses.asdict(PsamfConfig())) == PsamfConfig()  # a current model: as saved
