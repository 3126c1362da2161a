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


@pytest.mark.parametrize("override, message", [
    ("data.corpus=imdb", "data.corpus must be one of synthetic, mosi, mosei, sims, got 'imdb'"),
    ("data.format=csv", "data.format must be one of sdk, mmsa, mult, got 'csv'"),
    ("data.max_pickle_mb=0", "data.max_pickle_mb must be >= 1, got 0"),
    ("data.nonfinite=drop", "data.nonfinite must be one of zero, error, got 'drop'"),
    ("data.max_csd_mb=0", "data.max_csd_mb must be >= 1, got 0"),
    ("data.loo_users=0", "data.loo_users must be >= 1, got 0"),
    ("personality.max_train_clips=0", "personality.max_train_clips must be >= 1, got 0"),
    ("mult.n_heads=3", "mult.d_model must be a multiple of mult.n_heads (3), got 16"),
    ("user_adapter.position=middle", "user_adapter.position must be one of end, start, got 'middle'"),
    ("user_adapter.prompt_len=0", "user_adapter.prompt_len must be >= 1, got 0"),
    ("psamf.ablation=nope", "psamf.ablation must be one of none, no_personality, no_prefusion, "
                            "no_enhanced_fusion, no_ps, no_clm, got 'nope'"),
    ("psamf.sim_weight=cosine", "psamf.sim_weight must be one of affine, raw, clamp, got 'cosine'"),
    ("psamf.prefusion_text=words", "psamf.prefusion_text must be one of cls, tokens, got 'words'"),
    ("psamf.av_norm=video", "psamf.av_norm must be one of none, speaker, got 'video'"),
    ("psamf.tau=-1", "psamf.tau must be > 0, got -1.0"),
    ("psamf.max_len=1", "psamf.max_len must be >= 2, got 1"),
    ("psamf.split_layer=0", "psamf.split_layer must be >= 1, got 0"),
    ("train.lr_schedule=step", "train.lr_schedule must be one of constant, linear, cosine, got 'step'"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio must be < 1, got 1.5"),
    ("train.device=tpu", "train.device must be one of auto, cpu, cuda, got 'tpu'"),
    ("tune.pruner=nope", "tune.pruner must be one of median, hyperband, none, got 'nope'"),
    ("tune.n_trials=0", "tune.n_trials must be >= 1, got 0"),
    ("tune.tau_min=0", "tune.tau_min must be > 0, got 0.0"),
    ("tune.tau_min=0.9", "tune.tau_min must be <= tune.tau_max (0.5), got 0.9"),
    ("tune.lambda_min=2", "tune.lambda_min must be <= tune.lambda_max (1.0), got 2.0"),
    ("tune.epoch_budget=0", "tune.epoch_budget must be >= tune.epochs (1), got 0"),
    ("tune.heartbeat_interval=0", "tune.heartbeat_interval must be >= 1, got 0"),
    ("tune.max_retry=-1", "tune.max_retry must be >= 0, got -1"),
    ("registry.mae_margin=-0.1", "registry.mae_margin must be >= 0, got -0.1"),
    ("registry.acc2_margin=.inf", "registry.acc2_margin must be a finite number, got inf"),
])
def test_bad_values_fail_at_load_naming_the_key(override, message):
    with pytest.raises(InputError) as e:
        load_config("params.yaml", "smoke", [override])
    assert str(e.value) == f"--set: {message}"  # the source of the value that failed


def test_null_turns_an_optional_checked_key_off():
    cfg = load_config("params.yaml", "smoke", ["tune.epoch_budget=null", "tune.grace_period=null",
                                               "tune.max_retry=null", "personality.max_train_clips=null"])
    assert cfg.tune.epoch_budget is cfg.tune.grace_period is cfg.personality.max_train_clips is None


def test_checks_name_real_keys_and_hold_for_any_way_a_section_is_built():
    import dataclasses

    from psamf.config import CHOICES, RANGES, PsamfConfig, RegistryConfig

    for section, key in [*CHOICES, *RANGES]:
        assert key in {f.name for f in dataclasses.fields(getattr(Config(), section))}, (section, key)
    for (section, key), rules in RANGES.items():
        for _, bound in rules:
            assert not isinstance(bound, str) or hasattr(getattr(Config(), section), bound), (section, bound)
    with pytest.raises(InputError, match="psamf.tau must be > 0"):
        dataclasses.replace(PsamfConfig(), tau=0.0)
    with pytest.raises(InputError, match="registry.mae_margin must be >= 0"):
        RegistryConfig(mae_margin=-1.0)


def test_a_bad_value_is_one_line_and_exit_2_on_the_cli():
    run = subprocess.run([sys.executable, "-m", "psamf.cli.main", "config", "--set", "psamf.tau=-1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr == "psamf: error: --set: psamf.tau must be > 0, got -1.0\n"


def test_unknown_profile_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="unknown profile 'fast'"):
        load_config("params.yaml", "fast")
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match=str(bad)):
        load_config(bad)


def test_cli_prints_resolved_config_with_overrides():
    out = subprocess.run([sys.executable, "-m", "psamf.cli.main", "config", "--profile", "smoke",
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
    # before prefusion_text and av_gate existed the model fed [CLS_s, X_v, X_a], ungated
    assert old.prefusion_text == "cls" and old.av_gate is False
    with pytest.raises(InputError, match="psamf.ablation must be one of"):
        saved_psamf_config({"ablation": "no_text"})  # a saved config is checked like a loaded one
    assert SAVED_PSAMF_DEFAULTS != {k: getattr(PsamfConfig(), k) for k in SAVED_PSAMF_DEFAULTS}
    import dataclasses

    assert saved_psamf_config(dataclasses.asdict(PsamfConfig())) == PsamfConfig()  # a current model: as saved


def test_the_paper_profile_is_the_personalized_mult_paper():
    cfg = load_config(REPO / "params.yaml", "paper")
    # Sec. 5.3: 5 layers, 10 heads, output dimension 30, Adam 1e-3 for 40 epochs; Sec. 4.1: the
    # Conv1D in the adapter, no unknown row in training; fine-tuning 5-shot, 1e-4 / 1e-3, lambda 0.6.
    assert (cfg.mult.d_model, cfg.mult.n_heads, cfg.mult.n_layers) == (30, 10, 5)
    assert (cfg.pretrain.epochs, cfg.pretrain.lr) == (40, 1e-3)
    assert cfg.user_adapter.unknown_p == 0.0 and cfg.user_adapter.includes_conv
    assert (cfg.user_adapter.hidden, cfg.user_adapter.prompt_len, cfg.user_adapter.position) == (512, 1, "end")
    assert (cfg.finetune.k_shot, cfg.finetune.lr_base, cfg.finetune.lr_adapter, cfg.finetune.kd_lambda) == \
        (5, 1e-4, 1e-3, 0.6)


OFFICIAL_PSAMF = {"encoder": "bert-base-uncased", "split_layer": 11, "tau": 0.07, "aux_lambda": 1.0,
                  "lstm_hidden": 64, "attn_heads": 2, "align_dim": 64, "fusion_dim": 128, "max_len": 50,
                  "prefusion_text": "tokens", "prefusion_residual": False, "av_gate": False, "av_norm": "none",
                  "prefusion_av": "lstm_token", "prefusion_personality": True, "prefusion_init": "random",
                  "prefusion_params": "encoder", "align_layer": 10, "align_weight": "batch_distance",
                  "ps_projection": "separate", "clip_form": "official", "ccl_weight": 1.0, "ps_weight": 0.1,
                  "clm_weight": 0.09, "fusion_form": "official", "interaction_mask": False}
OFFICIAL_TRAIN = {"epochs": 100, "batch_size": 128, "lr": 5e-5, "lr_head": 5e-4, "optimizer": "adam",
                  "weight_decay": 1e-4, "grad_clip": 1.0, "init": "xavier_normal", "plateau_patience": 20,
                  "plateau_factor": 0.5, "lr_schedule": "constant", "warmup_ratio": 0.0}


def test_paper_profile_is_the_official_codes_form_and_demo_keeps_ours():
    import dataclasses

    from psamf.config import PsamfConfig, TrainConfig

    paper = load_config("params.yaml", "paper")
    assert {k: getattr(paper.psamf, k) for k in OFFICIAL_PSAMF} == OFFICIAL_PSAMF
    assert {k: getattr(paper.train, k) for k in OFFICIAL_TRAIN} == OFFICIAL_TRAIN
    demo = load_config("params.yaml", "demo")
    ours = {f.name for f in dataclasses.fields(PsamfConfig)} - {"max_len"}  # demo trims max_len only
    assert {k: getattr(demo.psamf, k) for k in ours} == {k: getattr(PsamfConfig(), k) for k in ours}
    for k in ("optimizer", "weight_decay", "grad_clip", "init", "plateau_patience"):
        assert getattr(demo.train, k) == getattr(TrainConfig(), k), k
    assert (demo.psamf.fusion_form, demo.psamf.clip_form, demo.train.optimizer) == ("ours", "ours", "adamw")


def test_cli_shows_the_paper_profiles_official_keys():
    out = subprocess.run([sys.executable, "-m", "psamf.cli.main", "config", "--profile", "paper"],
                         capture_output=True, text=True, check=True).stdout
    cfg = yaml.safe_load(out)

    def shown(section, want):  # YAML 1.1 reads the printed 5e-05 (no dot) as a string
        return {k: float(cfg[section][k]) if isinstance(v, float) else cfg[section][k] for k, v in want.items()}

    assert shown("psamf", OFFICIAL_PSAMF) == OFFICIAL_PSAMF
    assert shown("train", OFFICIAL_TRAIN) == OFFICIAL_TRAIN


@pytest.mark.parametrize("override, message", [
    ("psamf.align_layer=5", "psamf.align_layer must be <= psamf.split_layer (1), got 5"),
    ("psamf.align_layer=0", "psamf.align_layer must be >= 1, got 0"),
    ("psamf.ps_weight=-0.1", "psamf.ps_weight must be >= 0, got -0.1"),
    ("psamf.clm_weight=.inf", "psamf.clm_weight must be a finite number, got inf"),
    ("psamf.align_weight=mean", "psamf.align_weight must be one of sim_weight, batch_distance, got 'mean'"),
    ("psamf.fusion_form=theirs", "psamf.fusion_form must be one of ours, official, got 'theirs'"),
    ("train.plateau_factor=1", "train.plateau_factor must be < 1, got 1.0"),
    ("train.grad_clip=0", "train.grad_clip must be > 0, got 0.0"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1.0"),
    ("train.optimizer=sgd", "train.optimizer must be one of adamw, adam, got 'sgd'"),
])
def test_the_official_form_keys_are_checked(override, message):
    with pytest.raises(InputError) as e:
        load_config("params.yaml", "smoke", [override])
    assert str(e.value) == f"--set: {message}"


def test_a_model_saved_before_the_official_keys_keeps_our_form():
    import dataclasses

    from psamf.config import PsamfConfig, saved_psamf_config

    new_keys = ("prefusion_av", "prefusion_personality", "prefusion_init", "prefusion_params", "align_layer",
                "align_weight", "ps_projection", "clip_form", "ccl_weight", "ps_weight", "clm_weight",
                "fusion_form", "interaction_mask")
    saved = {k: v for k, v in dataclasses.asdict(PsamfConfig()).items() if k not in new_keys}
    old = saved_psamf_config(saved)
    assert {k: getattr(old, k) for k in new_keys} == {k: getattr(PsamfConfig(), k) for k in new_keys}
    assert old == PsamfConfig()


# ---------------------------------------------------------------------------- every numeric key is checked

def _numeric_keys():
    """(section, key, base type, is a list) for every int/float key (bools are not numbers) of every
    section dataclass, walked from Config: a key added later is in here without anyone listing it."""
    import dataclasses
    import types
    import typing

    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config).get(sec.name)
        if not dataclasses.is_dataclass(cls):
            continue
        for name, hint in typing.get_type_hints(cls).items():
            is_list = False
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is list:
                hint, is_list = typing.get_args(hint)[0], True
            if hint in (int, float):
                yield sec.name, name, hint, is_list


def test_every_numeric_key_has_a_declared_range():
    from psamf.config import RANGES

    keys = list(_numeric_keys())
    assert len(keys) > 80 and ("data", "seq_len", int, False) in keys and ("synth", "split", float, True) in keys
    missing = [f"{s}.{k}" for s, k, _, _ in keys if (s, k) not in RANGES]
    assert not missing, f"numeric config keys with no range in config.RANGES: {', '.join(missing)}"


def _violation(op: str, bound: float, kind: type):
    return {">=": bound - 1, ">": bound, "<": bound, "<=": bound + (1 if kind is int else 0.5)}[op]


@pytest.mark.parametrize("section, key, kind, is_list", list(_numeric_keys()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_numeric_key_refuses_out_of_range_and_non_finite_values(section, key, kind, is_list):
    from psamf.config import RANGES

    wrap = (lambda v: f"[{v}]") if is_list else str
    for op, bound in RANGES[section, key]:
        if isinstance(bound, str) or op == "a multiple of":
            continue
        bad = _violation(op, bound, kind)
        with pytest.raises(InputError, match=rf"^--set: {section}\.{key} must be {op} {bound}, got "):
            load_config("params.yaml", "smoke", [f"{section}.{key}={wrap(bad)}"])
    if kind is float:
        for bad in (".nan", ".inf", "-.inf"):
            with pytest.raises(InputError, match=rf"^--set: {section}\.{key} must be a finite number, got "):
                load_config("params.yaml", "smoke", [f"{section}.{key}={wrap(bad)}"])
    with pytest.raises(InputError, match=rf"{section}\.{key} must be"):  # a bool is not a number
        load_config("params.yaml", "smoke", [f"{section}.{key}={wrap('true')}"])


def test_a_zero_sequence_length_in_a_params_file_names_the_file_and_key(tmp_path):
    params = tmp_path / "team.yaml"
    params.write_text("data:\n  corpus: synthetic\n  seq_len: 0\n")
    with pytest.raises(InputError) as e:
        load_config(params, "smoke")
    assert str(e.value) == f"{params}: data.seq_len must be >= 1, got 0"
    prof = tmp_path / "prof.yaml"
    prof.write_text("profiles:\n  smoke:\n    train:\n      lr: .nan\n")
    with pytest.raises(InputError) as e:
        load_config(prof, "smoke")
    assert str(e.value) == f"{prof} (profiles.smoke): train.lr must be a finite number, got nan"


# ---------------------------------------------------------------------------- loading is bounded

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def _refused(path, *needles, overrides=()):
    import time

    t0 = time.perf_counter()
    with pytest.raises(InputError) as e:
        load_config(path, "smoke", list(overrides))
    took = time.perf_counter() - t0
    # Refused before any expansion: an unbounded loader takes minutes here (and the memory). The
    # bound only separates that from a refusal on a loaded CI box; it is no speed target.
    assert took < 30.0, took
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    return str(e.value)


@pytest.mark.parametrize("name, text, needles", [
    ("laughs", BOMB, ["b[0] (line 2): YAML alias *a refused"]),
    ("merge", "base: &b {seq_len: 3}\ndata:\n  <<: *b\n", ["data.<< (line 3): YAML alias *b refused"]),
    ("long", "data:\n  raw_dir: " + "x" * 200_000 + "\n", ["data.raw_dir (line 2): a value of 200000 characters"]),
    ("wide", "data:\n  junk: [" + ", ".join(["1"] * 25_000) + "]\n", ["data.junk", "more than 20000 YAML nodes"]),
    ("deep", "data: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 32 levels"]),
    ("big", "# padding\n" * 30_000 + "profile: smoke\n", ["bytes: over the 262144-byte cap"]),
    ("twice", "profile: smoke\ndata:\n  seq_len: 10\n  corpus: synthetic\n  seq_len: 20\n",
     ["key data.seq_len appears twice (lines 3 and 5)"]),
    ("twice_flow", "train: {lr: 0.1, lr: 0.2}\n", ["key train.lr appears twice (lines 1 and 1)"]),
    ("twice_profile", "profiles:\n  smoke:\n    mult:\n      n_heads: 2\n\n      n_heads: 4\n",
     ["key profiles.smoke.mult.n_heads appears twice (lines 4 and 6)"]),
    ("twice_top", "data: {}\nprofile: demo\ndata: {}\n", ["key data appears twice (lines 1 and 3)"]),
])
def test_hostile_params_files_are_refused_at_once_by_file_and_key(name, text, needles, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    msg = _refused(path, *needles)
    assert msg.startswith(f"{path}: "), msg


def test_set_values_and_the_kfp_params_text_go_through_the_same_bounded_loader(tmp_path, monkeypatch):
    from psamf.stages import stage_config

    _refused(REPO / "params.yaml", "--set: data.raw_dir (line 1): a value of 100000 characters",
             overrides=["data.raw_dir=" + "x" * 100_000])
    _refused(REPO / "params.yaml", "--set: data.raw_dir[1] (line 1): YAML alias *a refused",
             overrides=["data.raw_dir=[&a [1], *a]"])
    _refused(REPO / "params.yaml", "--set: key data.raw_dir.a appears twice", overrides=["data.raw_dir={a: 1, a: 2}"])
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # params_file writes the pipeline's text here
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(InputError, match=r"key data.seq_len appears twice \(lines 2 and 3\)"):
        stage_config("smoke", [], "data:\n  seq_len: 10\n  seq_len: 20\n")
    with pytest.raises(InputError, match="YAML alias"):
        stage_config("smoke", [], BOMB)
    with pytest.raises(InputError, match=r"--set: data.seq_len must be >= 1, got 0"):
        stage_config("smoke", ["data.seq_len=0"], "")


def test_a_bomb_is_one_line_and_exit_2_on_the_cli(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    run = subprocess.run([sys.executable, "-m", "psamf.cli.main", "config", "--params", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr == f"psamf: error: {path}: b[0] (line 2): YAML alias *a refused: " \
                                                 "a config file may not use anchors and aliases\n", run.stderr


# ---------------------------------------------------------------------------- best_params.json

@pytest.mark.parametrize("text, message", [
    ('{"psamf.aux_lambda": NaN}', "psamf.aux_lambda must be a finite number, got nan"),
    ('{"psamf.tau": Infinity}', "psamf.tau must be a finite number, got inf"),
    ('{"psamf.tau": -0.5}', "psamf.tau must be > 0, got -0.5"),
    ('{"psamf.split_layer": 0}', "psamf.split_layer must be >= 1, got 0"),
    ('{"psamf.aux_lambda": true}', "psamf.aux_lambda must be float, got True"),
    ('{"psamf.tau": 0.1, "psamf.tau": 0.2}', "not valid JSON (key 'psamf.tau' appears twice)"),
    ('{"psamf.encoder": "' + "x" * 10_000 + '"}', "psamf.encoder (line 1): a value of 10000 characters"),
    ('{"psamf.tau": 0.1, "pad": "' + " " * 300_000 + '"}', "bytes: over the 262144-byte cap"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deep)"),
])
def test_best_params_values_are_checked_like_every_config_value(text, message, tmp_path):
    from psamf.config import best_params_overrides

    path = tmp_path / "best_params.json"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_config("params.yaml", "smoke", ["train.epochs=1", *best_params_overrides(path)])
    assert str(e.value) == f"{path}: {message}" or (str(e.value).startswith(f"{path}: ") and message in str(e.value)), \
        str(e.value)[:300]


def test_a_nan_in_best_params_is_one_line_and_exit_2_before_training(tmp_path):
    path = tmp_path / "best_params.json"
    path.write_text('{"psamf.tau": 0.1, "psamf.aux_lambda": NaN}')
    run = subprocess.run([sys.executable, "-m", "psamf.cli.main", "train", "--profile", "smoke", "--best-params",
                          str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PSAMF_TRACKING": "off", "PYTHONPATH": str(REPO),
                              "PSAMF_PARAMS": str(REPO / "params.yaml")})
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr == f"psamf: error: {path}: psamf.aux_lambda must be a finite number, got nan\n"
