"""`psamf personality train`: the Personality BERT that PSA-MF reads CLS_p from.

A pre-trained BERT-architecture encoder (`personality.encoder`: the offline alias, any HF hub
id or a local HF dir) is fine-tuned on a First Impressions v2 corpus to regress the Big Five:

    transcript --encoder--> CLS --pooler (dense+tanh)--> dropout --> Linear(5)   (MSE)

i.e. `AutoModelForSequenceClassification` with five regression outputs (`problem_type =
"regression"`, `id2label` = the trait names), so the output directory is an ordinary HF
model directory:

    <personality.out_dir>/   config.json, model.safetensors, tokenizer files   (the encoder, HF format)
                             trait_head.safetensors   the classifier (pooler excluded: it is the encoder's)
                             metrics.json   per-trait Pearson r (valid + test), corpus, split

`AutoModel.from_pretrained(dir)` (and `psamf.models.encoders.load_encoder`) gives the fine-tuned
encoder, which is what PSA-MF loads as `psamf.personality_encoder`; `load_trait_model(dir)` gives
the whole regressor back (AutoModelForSequenceClassification whose logits are the traits in the
label scale). The head is kept out of model.safetensors so that loading the encoder is clean.

Decisions:
- Corpus (`personality.corpus`): `auto` = the real FI v2 at `<data.shared_dir or
  $PSAMF_SHARED_DATA>/first-impressions-v2` when `data.corpus` is mosi or mosei, else the synthetic one
  `psamf data synth` writes at `<data.raw_dir>/synthetic/first-impressions-v2`; `real` and
  `synthetic` name those two explicitly; anything else is a corpus directory.
- Splits: FI's official splits share speakers, so we re-split by YouTube id
  (`speaker_disjoint_split`, 70/15/15 of clips, seed `personality.split_seed`). Train on
  train, pick the epoch on valid MSE, report valid and test.
- Empty transcripts (11 in FI) are dropped from *training* only; valid/test keep every clip.
- Targets are z-scored per trait with the train statistics (every trait weighs the same in the
  MSE, and the head starts at the train mean); the z-scoring is folded into the saved
  classifier (W' = diag(sd) W, b' = sd * b + mean), so the saved model outputs raw trait values.
- The head trains at `personality.lr_head`, the encoder at `personality.lr` (a fresh head at an
  encoder-sized lr barely moves in one CPU epoch).
- `personality.max_train_clips` (null = all) caps the training clips, taken by a seeded draw
  of whole speakers' clips after the split; valid/test are never capped. For quick runs only.
- Device and bf16 autocast follow `train.device` / `train.amp`.
- Checkpoints (`fit`'s atomic last.pt/best.pt) live in `<out_dir>.ckpt/`, so `kill -9` and a
  rerun resume exactly; they are removed after a successful run unless
  `personality.keep_checkpoints`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from psamf import tracking
from psamf.checkpoints import store_for
from psamf.config import REAL_CORPORA, Config
from psamf.data.first_impressions import (FI_DIRNAME, SYNTHETIC_MARKER, TRAITS, corpus_info,
                                    load_personality_corpus, speaker_disjoint_split)
from psamf.errors import InputError
from psamf.io import atomic_dir
from psamf.metrics import check_finite_preds, pearson_r
from psamf.models.encoders import resolve_encoder
from psamf.training import (Batch, BatchProgress, autocast, config_fingerprint, discard_checkpoints, fit, predict,
                            resolve_device, seed_everything, to_device, tokenize, trim_padding)

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
TRAIT_HEAD_FILE = "trait_head.safetensors"


# ---------------------------------------------------------------------------- corpus

def personality_corpus_dir(cfg: Config) -> Path:
    """Where `personality.corpus` points (see the module docstring); not checked for existence."""
    name = cfg.personality.corpus
    real = cfg.data.shared_path / FI_DIRNAME
    synthetic = Path(cfg.data.raw_dir) / "synthetic" / FI_DIRNAME
    if name == "auto":
        return real if cfg.data.corpus in REAL_CORPORA else synthetic
    if name == "real":
        return real
    if name == "synthetic":
        return synthetic
    return Path(name)


def load_split_corpus(cfg: Config) -> tuple[pd.DataFrame, Path, bool]:
    """The corpus frame with a speaker-disjoint `split` column, its directory, and whether it is synthetic."""
    d = personality_corpus_dir(cfg)
    if not d.is_dir():
        if d == Path(cfg.data.raw_dir) / "synthetic" / FI_DIRNAME:
            hint = "run `psamf data synth` first"
        elif d == cfg.data.shared_path / FI_DIRNAME:
            hint = "put ChaLearn First Impressions v2 there (set $PSAMF_SHARED_DATA or data.shared_dir)"
        else:
            hint = "set personality.corpus to auto | real | synthetic | a First Impressions v2 directory"
        raise InputError(d, f"personality corpus not found; {hint}")
    df = load_personality_corpus(d)
    df = speaker_disjoint_split(df, SPLIT_FRACTIONS, seed=cfg.personality.split_seed)
    synthetic = (d / SYNTHETIC_MARKER).is_file()  # `psamf data synth` marks its corpus
    return df, d, synthetic


def cap_train(df: pd.DataFrame, max_clips: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `max_clips` train clips: whole speakers in a seeded order (valid/test untouched)."""
    if max_clips is None:
        return df
    train = df[df["split"] == "train"]
    if len(train) <= max_clips:
        return df
    speakers = np.array(sorted(train["youtube_id"].unique()))
    order = np.random.default_rng(seed).permutation(len(speakers))
    counts = train.groupby("youtube_id").size()
    keep, n = [], 0
    for s in speakers[order]:
        if n + counts[s] > max_clips and n > 0:
            continue
        keep.append(s)
        n += counts[s]
        if n >= max_clips:
            break
    drop = (df["split"] == "train") & ~df["youtube_id"].isin(keep)
    return df[~drop].reset_index(drop=True)


# ---------------------------------------------------------------------------- model

def _from_pretrained(auto_cls, name: str, what: str, **kwargs):
    path = resolve_encoder(name)
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        where = "" if Path(path).exists() else "not a local directory; as a hub id: "
        raise InputError(name, f"cannot load {what} ({where}{str(e).splitlines()[0]})") from None


def build_trait_model(name: str, dropout: float | None = None) -> nn.Module:
    """AutoModelForSequenceClassification with one regression output per Big Five trait."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = dict(num_labels=len(TRAITS), problem_type="regression",
                                  id2label=dict(enumerate(TRAITS)), label2id={t: i for i, t in enumerate(TRAITS)})
    if dropout is not None:
        kwargs["classifier_dropout"] = dropout
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is expected: that is the head we train
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, name, "personality encoder", **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not hasattr(getattr(model, "base_model", None), "encoder"):
        raise InputError(name, f"{type(model).__name__} is not a BERT-architecture encoder")
    return model


def _head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "classifier", None)
    while isinstance(head, nn.Module) and not isinstance(head, nn.Linear):
        head = getattr(head, "out_proj", None)  # RoBERTa-style heads end in out_proj
    if not isinstance(head, nn.Linear) or head.out_features != len(TRAITS):
        raise InputError("personality.encoder", "model has no Linear(…, 5) classifier head to train")
    return head


def _param_groups(model: nn.Module, lr: float, lr_head: float) -> list[dict]:
    head = {id(p) for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")}
    params = list(model.named_parameters())
    return [{"params": [p for _, p in params if id(p) not in head], "lr": lr},
            {"params": [p for _, p in params if id(p) in head], "lr": lr_head}]


def trait_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = labels.mean(0)
    sd = labels.std(0)
    return mean, np.where(sd > 1e-6, sd, 1.0)


def trait_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Per-trait Pearson r / MAE and their means; predictions clipped to [0, 1] like the labels."""
    p = np.clip(pred, 0.0, 1.0)
    r = {t: pearson_r(p[:, i], labels[:, i]) for i, t in enumerate(TRAITS)}
    mae = {t: float(np.mean(np.abs(p[:, i] - labels[:, i]))) for i, t in enumerate(TRAITS)}
    finite = [v for v in r.values() if np.isfinite(v)]
    return {"r": r, "mean_r": float(np.mean(finite)) if finite else float("nan"),
            "mae": mae, "mean_mae": float(np.mean(list(mae.values()))), "n": int(len(labels))}


# ---------------------------------------------------------------------------- stage

def ckpt_dir_for(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".ckpt")


def train_personality(cfg: Config, *, on_epoch=None) -> dict[str, Any]:
    """Fine-tune the personality encoder; write the HF dir + metrics.json; return the report."""
    pc = cfg.personality
    df, corpus_dir, synthetic = load_split_corpus(cfg)
    df = cap_train(df, pc.max_train_clips, pc.split_seed)
    train_df = df[(df["split"] == "train") & ~df["empty_text"]]
    if train_df.empty:
        raise InputError(corpus_dir, "no training clips with a transcript after the speaker-disjoint split")
    # The run opens once the inputs are checked, so it spans loading the encoder and tokenizing too.
    tags = {"personality_corpus": str(corpus_dir), "personality_synthetic": synthetic, "encoder": pc.encoder}
    with tracking.stage_run(cfg, "personality", tags=tags):
        out_dir = Path(pc.out_dir)
        ckpt = ckpt_dir_for(out_dir)
        device = resolve_device(cfg.train.device)
        amp = bool(cfg.train.amp) and device.type == "cuda"

        from psamf.models.encoders import load_tokenizer

        tokenizer = load_tokenizer(pc.encoder)
        seed_everything(pc.split_seed)
        model = build_trait_model(pc.encoder)

        labels = {s: df.loc[df["split"] == s, list(TRAITS)].to_numpy(np.float32) for s in ("valid", "test")}
        y_train = train_df[list(TRAITS)].to_numpy(np.float32)
        mean, sd = trait_stats(y_train)
        head = _head(model)
        with torch.no_grad():  # the head starts at the train mean (zero in z units)
            head.bias.zero_()

        def tensors(frame: pd.DataFrame, y: np.ndarray | None = None) -> dict[str, torch.Tensor]:
            t = tokenize(tokenizer, frame["text"].tolist(), pc.max_len)
            if y is not None:
                t["label"] = torch.from_numpy(((y - mean) / sd).astype(np.float32))
            return t

        train = tensors(train_df, y_train)
        evals = {s: tensors(df[df["split"] == s]) for s in ("valid", "test")}
        model.to(device)

        def forward(m: nn.Module, b: Batch) -> torch.Tensor:
            b = to_device(trim_padding(b), device)
            inputs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with autocast(device, amp):
                return m(**inputs).logits.float()

        progress = BatchProgress(len(train["label"]), pc.batch_size, "personality")

        def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
            progress.step()
            return nn.functional.mse_loss(forward(m, b), b["label"].to(device))

        def raw_pred(m: nn.Module, split: str) -> np.ndarray:
            return predict(m, evals[split], forward, batch_size=max(64, pc.batch_size)) * sd + mean

        def evaluate(m: nn.Module) -> dict[str, float]:
            progress.close()
            p = raw_pred(m, "valid")
            check_finite_preds(p, "valid")  # NaN would pass np.clip and never be the best: fit reports it
            met = trait_metrics(p, labels["valid"])
            return {"valid_mse": float(np.mean((np.clip(p, 0, 1) - labels["valid"]) ** 2)),
                    "valid_mean_r": met["mean_r"], **{f"valid_r_{t}": v for t, v in met["r"].items()}}

        opt = torch.optim.AdamW(_param_groups(model, pc.lr, pc.lr_head), foreach=True)
        fp = config_fingerprint({"personality": {k: v for k, v in asdict(pc).items()
                                                 if k not in ("epochs", "out_dir", "keep_checkpoints")},
                                 "n_train": len(train_df),
                                 "device": device.type, "amp": amp, "files": _files_key(corpus_dir)})
        info = corpus_info(df)
        store = store_for(cfg, "personality", fp)
        result = fit(model, opt, train, loss_fn, evaluate, epochs=pc.epochs, batch_size=pc.batch_size,
                     patience=max(1, pc.epochs), seed=pc.split_seed, ckpt_dir=ckpt, fingerprint=fp,
                     monitor="valid_mse", on_epoch=on_epoch or tracking.epoch_logger(), desc="personality",
                     store=store, suspects={"personality.lr": pc.lr, "personality.lr_head": pc.lr_head})
        progress.close()
        metrics = {s: trait_metrics(raw_pred(model, s), labels[s]) for s in ("valid", "test")}
        _fold_standardization(head, mean, sd)
        report = {
            "stage": "personality", "encoder": pc.encoder, "corpus_dir": str(corpus_dir),
            "corpus": "synthetic-first-impressions-v2" if synthetic else "first-impressions-v2",
            "synthetic": synthetic, "split": "speaker_disjoint", "split_seed": pc.split_seed,
            "split_fractions": list(SPLIT_FRACTIONS), "traits": list(TRAITS),
            "neuroticism_means": "emotional stability (higher = calmer), as FI labels it",
            "n_train": int(len(train_df)), "n_valid": metrics["valid"]["n"], "n_test": metrics["test"]["n"],
            "dropped_empty_train": int((df["split"] == "train").sum() - len(train_df)),
            "clips_per_split": info["split"]["clips"], "speakers_per_split": info["split"]["youtube_ids"],
            "max_len": pc.max_len, "epochs": pc.epochs, "best_epoch": result.best_epoch,
            "resumed_from_epoch": result.resumed_from, "device": device.type,
            "valid": metrics["valid"], "test": metrics["test"], "history": result.history,
            "out_dir": str(out_dir),
        }
        model.to("cpu")
        with atomic_dir(out_dir) as tmp:
            save_trait_model(model, tokenizer, tmp)
            (tmp / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        tracking.log_metrics({**{f"{s}_mean_r": metrics[s]["mean_r"] for s in metrics},
                              **{f"{s}_r_{t}": v for s in metrics for t, v in metrics[s]["r"].items()},
                              "best_epoch": result.best_epoch})
        tracking.log_artifact(out_dir / "metrics.json", "personality")
    discard_checkpoints(ckpt, store, pc.keep_checkpoints)
    return report


def save_trait_model(model: nn.Module, tokenizer, out_dir: str | Path) -> None:
    """The encoder as a plain HF model dir (what AutoModel / PSA-MF load, without a report of
    unexpected head keys) + the trait head beside it in `trait_head.safetensors`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    prefix = model.base_model_prefix + "."
    model.base_model.save_pretrained(out_dir)  # config.json keeps num_labels / id2label / problem_type
    tokenizer.save_pretrained(out_dir)
    head = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefix)}
    save_file(head, str(out_dir / TRAIT_HEAD_FILE), metadata={"traits": ",".join(TRAITS)})


def load_trait_model(model_dir: str | Path) -> nn.Module:
    """The saved encoder + trait head as AutoModelForSequenceClassification: logits = Big Five in [0, 1]
    scale (unclipped), columns in `TRAITS` order (= config.id2label)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    head_file = model_dir / TRAIT_HEAD_FILE
    if not head_file.is_file():
        raise InputError(head_file, "missing; not a directory written by `psamf personality train`")
    model = build_trait_model(str(model_dir))
    missing, unexpected = model.load_state_dict(load_file(str(head_file)), strict=False)
    prefix = model.base_model_prefix + "."
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise InputError(head_file, f"does not match the encoder (unexpected {unexpected[:3]}, "
                                    f"missing {[k for k in missing if not k.startswith(prefix)][:3]})")
    return model.eval()


def _fold_standardization(head: nn.Linear, mean: np.ndarray, sd: np.ndarray) -> None:
    """z = W h + b predicts (y - mean) / sd; make the head predict y: W' = sd W, b' = sd b + mean."""
    with torch.no_grad():
        s = torch.as_tensor(sd, dtype=head.weight.dtype, device=head.weight.device)
        m = torch.as_tensor(mean, dtype=head.weight.dtype, device=head.weight.device)
        head.weight.mul_(s[:, None])
        head.bias.mul_(s).add_(m)


def _files_key(d: Path) -> list:
    """Content identity of the corpus files for the resume fingerprint (a retried pod downloads
    them anew, so names, sizes and mtimes would not match; a few MB hash in milliseconds)."""
    from psamf.fingerprint import file_sha256

    return [(p.name, file_sha256(p)) for p in sorted(d.glob("*.pkl"))]


def load_personality_report(out_dir: str | Path) -> dict[str, Any]:
    p = Path(out_dir) / "metrics.json"
    if not p.is_file():
        raise InputError(p, "missing; run `psamf personality train` first")
    return json.loads(p.read_text())
