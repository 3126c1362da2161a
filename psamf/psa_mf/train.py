"""`psamf train`: PSA-MF on the prepared dataset, plus the text-only baseline.

    train_psamf(cfg, trial=None, out_dir=None)   PSA-MF (cfg.psamf, incl. its ablation)
    train_text_baseline(cfg, out_dir=None)       the same text encoder + Linear(1) on CLS, L1

Both use the standard folds of the prepared dataset: fit on split=train, early-stop and pick
the epoch on valid MAE, report valid (at the best epoch) and test in every metric convention
(psamf.metrics.CONVENTIONS). Both train through psamf.training.fit. A tune trial (`trial=`)
chooses, so it gets train and valid only: the test rows are dropped before any tensor is made.

Inputs per segment: the transcript tokenized with the text encoder's tokenizer
(`psamf.max_len`; each batch is trimmed to its longest row, which changes nothing but speed);
when the personality encoder's tokenizer gives different ids, also with its own
(`personality_*` keys); the prepared audio/visual arrays and masks.

Outputs, in `out_dir` (default `<train.out_dir>/<corpus>` for the full model,
`<train.out_dir>/<corpus>/<ablation>` for an ablation, `<train.out_dir>/<corpus>/text_baseline`):

    model.pt        state_dict + everything to rebuild the model without the original encoder
                    directories (PsamfConfig, the encoders' HF configs, dims, max_len); `load_model`
    tokenizer/      the text tokenizer (and personality_tokenizer/ when it differs)
    metrics.json    the report `train_psamf` returns
    predictions.csv segment_id, speaker_id, split, label, pred for every valid and test segment
    history.csv     one row per epoch: train loss and its parts, every valid metric
    ckpt/           fit's last.pt / best.pt while training; a rerun after `kill -9` resumes from
                    it exactly (same fingerprint); removed after success unless train.keep_checkpoints

The resume fingerprint covers every setting that changes the numbers (psamf.*, train.* except
out_dir, the device, the data manifest and the encoder directories' files). It leaves out
`train.epochs` when the LR is constant (`train.lr_schedule: constant`, no warmup): then a
finished 2-epoch run's checkpoint continues to epoch 5 exactly as an uninterrupted 5-epoch run
would have. With a schedule (e.g. `train.lr_schedule: linear`, or any `train.warmup_ratio`) the
run's length sets the LR at every step, so epochs is in the fingerprint too.

Optuna: with `trial`, every epoch reports valid MAE (`trial.report(valid_mae, epoch)`); when
`trial.should_prune()` the run stops after that epoch's checkpoint is written, metrics.json
records `pruned: true`, and `optuna.TrialPruned` is raised.

Device: `train.device` auto | cpu | cuda; bf16 autocast on CUDA when `train.amp` (the model
computes its losses in fp32). On CPU, runs are deterministic for a seed (`train.seed`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from psamf import tracking
from psamf.checkpoints import store_for
from psamf.config import Config, TrainConfig, saved_psamf_config
from psamf.data.align import av_inputs
from psamf.data.prepared import PreparedDataset, load_prepared
from psamf.errors import InputError
from psamf.io import atomic_dir, atomic_path, write_json
from psamf.metrics import CONVENTIONS, regression_metrics
from psamf.reports.html import write_csv
from psamf.training import (PERSONALITY_PREFIX, TEXT_KEYS, Batch, BatchProgress, autocast, config_fingerprint,
                            discard_checkpoints, fit, predict, resolve_device, seed_everything, tensor_digest, to_device,
                            tokenize, trim_padding)

log = logging.getLogger(__name__)

MODEL_FORMAT = "psamf-model/1"


# ---------------------------------------------------------------------------- shared helpers

def dir_identity(name_or_path: str) -> Any:
    """The content hash of a local model dir (a retried pod downloads it anew, so mtimes would
    differ); the name for anything else."""
    from psamf.fingerprint import tree_sha256

    p = Path(name_or_path)
    return tree_sha256(p) if p.is_dir() else str(name_or_path)


# ---------------------------------------------------------------------------- inputs

def default_out_dir(cfg: Config, kind: str = "psamf") -> Path:
    base = Path(cfg.train.out_dir) / cfg.data.corpus
    if kind == "text_baseline":
        return base / "text_baseline"
    return base if cfg.psamf.ablation == "none" else base / cfg.psamf.ablation


def check_personality_encoder(cfg: Config) -> None:
    """Fail early, naming the path, when the personality encoder is a local path that is not there."""
    from psamf.models.encoders import resolve_encoder

    if cfg.psamf.ablation == "no_personality":
        return
    name = cfg.psamf.personality_encoder
    if resolve_encoder(name) != name:  # an alias
        return
    p = Path(name).expanduser()
    hint = "run `psamf personality train` first, or set psamf.personality_encoder to a HF id or model directory"
    if p.exists():
        if not (p / "config.json").is_file():
            raise InputError(p, f"not a HF model directory (no config.json); {hint}")
        return
    first = Path(name).parts[0] if Path(name).parts else ""
    looks_local = (p.is_absolute() or name.startswith((".", "~")) or p == Path(cfg.personality.out_dir)
                   or (len(Path(name).parts) > 2) or (first and Path(first).is_dir()))
    if looks_local:
        raise InputError(p, f"personality encoder not found; {hint}")


SPLITS = ("train", "valid", "test")
SELECTION_SPLITS = ("train", "valid")  # what a tune trial may see: it chooses, so never the test split


def load_split_data(cfg: Config, splits: tuple[str, ...] = SPLITS) -> PreparedDataset:
    """The prepared data restricted to `splits` (each must have segments); the other rows are
    dropped before any tensor is made from them."""
    ds = load_prepared(cfg.data.prepared_path)
    for split in splits:
        if not (ds.segments["split"] == split).any():
            raise InputError(cfg.data.prepared_path / "segments.parquet", f"no {split} segments")
    keep = ds.segments["split"].isin(splits).to_numpy()
    return ds if keep.all() else ds.subset(keep)


def segment_tensors(cfg: Config, ds: PreparedDataset, personality: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Token ids (+ personality ids when its tokenizer differs), AV arrays + masks, labels."""
    from psamf.models.encoders import load_tokenizer

    texts = ds.segments["text"].fillna("").tolist()
    tok = load_tokenizer(cfg.psamf.encoder)
    t = tokenize(tok, texts, cfg.psamf.max_len)
    info = {"tokenizer": tok, "personality_tokenizer": None}
    if personality:
        ptok = load_tokenizer(cfg.psamf.personality_encoder)
        pt = tokenize(ptok, texts, cfg.psamf.max_len)
        same = all(k in pt and t[k].shape == pt[k].shape and torch.equal(t[k], pt[k])
                   for k in ("input_ids", "attention_mask"))
        if not same:
            t.update({PERSONALITY_PREFIX + k: v for k, v in pt.items()})
            info["personality_tokenizer"] = ptok
    a = {m: av_inputs(ds.arrays[m], ds.arrays[f"{m}_mask"], ds.segments["speaker_id"].to_numpy(), cfg.psamf.av_norm)
         for m in ("audio", "visual")}
    t.update({
        "audio": torch.from_numpy(a["audio"]),
        "visual": torch.from_numpy(a["visual"]),
        "audio_mask": torch.from_numpy(ds.arrays["audio_mask"].astype(bool)),
        "visual_mask": torch.from_numpy(ds.arrays["visual_mask"].astype(bool)),
        "label": torch.from_numpy(ds.segments["label"].to_numpy(np.float32)),
    })
    return t, info


def personality_cls_table(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                          batch_size: int, cache: dict[str, torch.Tensor] | None = None,
                          identity: Any = None) -> torch.Tensor:
    """CLS_p of every segment, computed once. The personality encoder is frozen and in eval mode,
    so its output per segment is the same every epoch; computing it per batch cost a forward pass
    of a whole encoder per step (about a quarter of an epoch's work).

    `cache` (with the encoder's `identity`, dir_identity) keeps tables across calls: a tune worker's
    trials share the segments and the frozen encoder, so each trial after the first reads the table.
    The key covers the encoder, the token tensors, the device and the batch size, so a hit is the
    table this call would compute."""
    keys = [k for k in tensors if k in TEXT_KEYS or k[len(PERSONALITY_PREFIX):] in TEXT_KEYS]
    memo = None
    if cache is not None:
        memo = config_fingerprint([identity, device.type, batch_size, tensor_digest({k: tensors[k] for k in keys})])
        if memo in cache:
            return cache[memo]
    n = len(tensors["input_ids"])
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = to_device(trim_padding({k: tensors[k][i:i + batch_size] for k in keys}), device)
            out.append(model.personality_cls(b).float().cpu())
    table = torch.cat(out) if out else torch.empty(0)
    if memo is not None:
        cache[memo] = table
    return table


def take(tensors: dict[str, torch.Tensor], mask: np.ndarray) -> dict[str, torch.Tensor]:
    idx = torch.from_numpy(np.flatnonzero(mask))
    return {k: v[idx] for k, v in tensors.items()}


# ---------------------------------------------------------------------------- models

class TextRegressor(nn.Module):
    """The text-only baseline: the encoder's last-layer CLS -> dropout -> Linear(1)."""

    def __init__(self, encoder: nn.Module, dropout: float = 0.1):
        super().__init__()
        from psamf.models.encoders import base_model

        self.encoder = base_model(encoder)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.encoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         token_type_ids=batch.get("token_type_ids")).last_hidden_state[:, 0]
        return self.head(self.drop(h)).squeeze(-1)

    def param_groups(self, lr: float, lr_head: float) -> list[dict]:
        enc = {id(p) for p in self.encoder.parameters()}
        ps = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in ps if id(p) in enc], "lr": lr},
                {"params": [p for p in ps if id(p) not in enc], "lr": lr_head}]


def _encoder_from_config(conf: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    d = dict(conf)
    return AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d))


def read_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A saved model.pt as its dict (weights + metadata): the one reader for train, serving and register."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing; run `psamf train` first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise InputError(path, f"not a readable model file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise InputError(path, "not a PSA-MF checkpoint (no state_dict)")
    return state


def load_model(model_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved PSA-MF or text baseline from `<model_dir>/model.pt` (no encoder download).

    Returns (model in eval mode, the saved metadata without the state_dict). The tokenizers are
    in `<model_dir>/tokenizer` (and `personality_tokenizer` when the personality one differs).
    """
    from psamf.models.psamf import PSAMF

    path = Path(model_dir) / "model.pt"
    state = read_model_file(path, map_location)
    if state.get("format") != MODEL_FORMAT:
        raise InputError(path, f"not a psamf model file (format {state.get('format')!r})")
    confs = state["encoder_configs"]
    if state["kind"] == "psamf":
        pcfg = saved_psamf_config(state["psamf_config"])
        pers = _encoder_from_config(confs["personality"]) if confs.get("personality") else None
        model: nn.Module = PSAMF(_encoder_from_config(confs["text"]), pers, pcfg,
                                 audio_dim=state["audio_dim"], visual_dim=state["visual_dim"])
    else:
        model = TextRegressor(_encoder_from_config(confs["text"]), state.get("dropout", 0.1))
    model.load_state_dict(state["state_dict"])
    meta = {k: v for k, v in state.items() if k != "state_dict"}
    return model.eval(), meta


# ---------------------------------------------------------------------------- the shared run

def _run(cfg: Config, *, kind: str, ds: PreparedDataset, tensors: dict[str, torch.Tensor],
         model: nn.Module, loss_parts: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
         forward: Callable[[nn.Module, Batch], torch.Tensor], device: torch.device, amp: bool,
         out_dir: Path, fingerprint: dict, save_extra: dict, tokenizers: dict, trial=None,
         run_name: str) -> dict[str, Any]:
    """Fit, score and save, inside the caller's `train` run (_train_run)."""
    tc = cfg.train
    split = ds.segments["split"].to_numpy()
    data = {s: take(tensors, split == s) for s in SPLITS if (split == s).any()}
    if trial is not None and "test" in data:  # load_split_data dropped them; a trial must never score test
        raise RuntimeError("a tune trial was handed test segments")
    ckpt = out_dir / "ckpt"
    progress = BatchProgress(len(data["train"]["label"]), tc.batch_size, run_name)
    parts_sum: dict[str, float] = {}
    parts_n = [0]

    def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        progress.step()
        b = to_device(trim_padding(b), device)
        with autocast(device, amp):
            total, parts = loss_parts(m, b)
        n = len(b["label"])
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v * n
        parts_n[0] += n
        return total

    def pred_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        b = to_device(trim_padding({k: v for k, v in b.items() if k != "label"}), device)
        with autocast(device, amp):
            return forward(m, b).float()

    held_out: dict[str, np.ndarray] = {}  # the final model's valid/test predictions, for predictions.csv

    def scores(m: nn.Module, s: str, keep: bool = False) -> dict[str, float]:
        p = predict(m, data[s], pred_fn, batch_size=max(64, tc.batch_size))
        if keep:
            held_out[s] = p
        return regression_metrics(p, data[s]["label"].numpy())

    def evaluate(m: nn.Module) -> dict[str, float]:
        progress.close()
        train_parts = {f"train_{k}": v / max(parts_n[0], 1) for k, v in parts_sum.items()}
        parts_sum.clear()
        parts_n[0] = 0
        return {**{f"valid_{k}": v for k, v in scores(m, "valid").items()}, **train_parts}

    pruned = {"epoch": None}

    def should_stop(epoch: int, metrics: dict[str, float]) -> bool:
        if trial is None:
            return False
        trial.report(float(metrics["valid_mae"]), epoch)
        if trial.should_prune():
            pruned["epoch"] = epoch
            return True
        return False

    fp = config_fingerprint(fingerprint)
    opt = make_optimizer(model, tc)
    scheduler = lr_scheduler(opt, tc, n_train=len(data["train"]["label"]))
    store = store_for(cfg, "tune-trial" if trial is not None else "train", fp)
    result = fit(model, opt, data["train"], loss_fn, evaluate, epochs=tc.epochs, batch_size=tc.batch_size,
                 patience=tc.patience, seed=tc.seed, ckpt_dir=ckpt, fingerprint=fp, monitor="valid_mae",
                 grad_clip=tc.grad_clip,
                 on_epoch=tracking.epoch_logger(), desc=run_name, should_stop=should_stop,
                 scheduler=scheduler, store=store, suspects=_suspects(cfg, kind))
    progress.close()
    report: dict[str, Any] = {
        "model": kind, "corpus": cfg.data.corpus, "av_simulated": ds.av_simulated,
        "ablation": cfg.psamf.ablation if kind == "psamf" else None,
        "text_encoder": cfg.psamf.encoder, "profile": cfg.profile,
        "n_train": len(data["train"]["label"]), "n_valid": len(data["valid"]["label"]),
        "n_test": len(data["test"]["label"]) if "test" in data else 0, "epochs": tc.epochs, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
        "history": result.history, "device": device.type, "amp": amp, "fingerprint": fp,
        "out_dir": str(out_dir), "model_dir": str(out_dir), "pruned": pruned["epoch"] is not None,
        "metric_conventions": CONVENTIONS,
    }
    if kind == "psamf":
        report["personality_encoder"] = (None if cfg.psamf.ablation == "no_personality"
                                         else cfg.psamf.personality_encoder)
    if report["pruned"]:
        report.update(pruned_epoch=pruned["epoch"], valid={"mae": result.best_score})
        tracking.set_tags({"pruned": True})
    elif trial is not None:
        # A tune trial chooses, so it is scored on valid only, and fit() left the best epoch's
        # weights in the model, whose valid scores that epoch's evaluate() has already logged.
        best = next(h for h in result.history if h["epoch"] == result.best_epoch)
        report["valid"] = {k[len("valid_"):]: v for k, v in best.items() if k.startswith("valid_")}
        if cfg.tune.keep_trial_models:  # otherwise the trial's model is thrown away: no file worth its writing
            _save_model(out_dir, model, kind=kind, cfg=cfg, extra=save_extra, tokenizers=tokenizers,
                        fingerprint=fp, av_simulated=ds.av_simulated)
    else:
        report["valid"] = scores(model, "valid", keep=True)
        report["test"] = scores(model, "test", keep=True)
        write_predictions(out_dir / PREDICTIONS, ds, held_out)
        write_csv(out_dir / HISTORY, pd.DataFrame(result.history))  # x = epoch, for `dvc plots`
        tracking.log_artifact(out_dir / PREDICTIONS, "train")
        _save_model(out_dir, model, kind=kind, cfg=cfg, extra=save_extra, tokenizers=tokenizers, fingerprint=fp,
                    av_simulated=ds.av_simulated)
    write_json(out_dir / "metrics.json", report)
    if not report["pruned"]:
        tracking.log_metrics({**{f"best_valid_{k}": v for k, v in report["valid"].items()},
                              **{f"test_{k}": v for k, v in report.get("test", {}).items()},
                              "best_epoch": result.best_epoch})
        tracking.log_artifact(out_dir / "metrics.json", "train")
    discard_checkpoints(ckpt, store, tc.keep_checkpoints)
    return report


def _pruned(report: dict[str, Any]) -> Exception:
    """Raised by the caller once its run is closed: a pruned trial's train run ends FINISHED."""
    import optuna

    return optuna.TrialPruned(f"pruned after epoch {report['pruned_epoch']} "
                              f"(valid MAE {report['history'][-1]['valid_mae']:.4f})")


def _suspects(cfg: Config, kind: str) -> dict[str, Any]:
    """The settings most likely at fault when a run diverges: its learning rates (and schedule),
    and for PSA-MF the weight and temperature of the auxiliary losses."""
    tc = cfg.train
    out: dict[str, Any] = {"train.lr": tc.lr, "train.lr_head": tc.lr_head}
    if tc.lr_schedule != "constant" or tc.warmup_ratio:
        out.update({"train.lr_schedule": tc.lr_schedule, "train.warmup_ratio": tc.warmup_ratio})
    if kind == "psamf":
        out.update({"psamf.aux_lambda": cfg.psamf.aux_lambda, "psamf.tau": cfg.psamf.tau})
    return out


PREDICTIONS = "predictions.csv"
HISTORY = "history.csv"


def write_predictions(path: Path, ds: PreparedDataset, preds: dict[str, np.ndarray]) -> Path:
    """One row per held-out segment (the splits in `preds`, in dataset order), so per-speaker scores
    (psamf report) need no model and no GPU. Training segments are left out: a score on them is
    in-sample, and predicting them would cost another pass over the largest split."""
    split = ds.segments["split"].to_numpy()
    rows = []
    for s, p in preds.items():
        sub = ds.segments.loc[split == s, ["segment_id", "speaker_id", "split", "label"]].copy()
        sub["pred"] = np.asarray(p, dtype=np.float64)
        rows.append(sub)
    with atomic_path(path) as tmp:
        pd.concat(rows).to_csv(tmp, index=False, float_format="%.6g")
    return path


def _save_model(out_dir: Path, model: nn.Module, *, kind: str, cfg: Config, extra: dict, tokenizers: dict,
                fingerprint: str, av_simulated: bool) -> None:
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {"format": MODEL_FORMAT, "kind": kind, "state_dict": weights,
             "psamf_config": asdict(cfg.psamf), "max_len": cfg.psamf.max_len, "tokenizer": cfg.psamf.encoder,
             "corpus": cfg.data.corpus, "av_simulated": av_simulated, "fingerprint": fingerprint, **extra}
    for name, tok in tokenizers.items():
        if tok is not None:
            with atomic_dir(out_dir / name) as tmp:
                tok.save_pretrained(tmp)
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(state, tmp)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """`train.optimizer` over the model's two groups (encoder at lr, the rest at lr_head), both with
    `train.weight_decay`: adamw decouples it, adam adds it to the gradient (L2, the official code).
    `train.init: xavier_normal` first redraws every matrix (dim > 1) of the second group, as the
    official code does for its non-BERT parameters."""
    groups = model.param_groups(tc.lr, tc.lr_head)
    if tc.init == "xavier_normal":
        for p in groups[-1]["params"]:
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, weight_decay=tc.weight_decay, foreach=True)


def _scheduled(tc: TrainConfig) -> bool:
    """Whether the LR changes over the run (a schedule or a warmup), so the run's length matters."""
    return tc.lr_schedule != "constant" or bool(tc.warmup_ratio)


def lr_scheduler(opt: torch.optim.Optimizer, tc: TrainConfig, n_train: int):
    """transformers' schedule `train.lr_schedule` over the whole run (epochs x batches per epoch),
    warming up for `train.warmup_ratio` of it; None for "constant" without warmup (the old loop).
    With `train.plateau_patience`: ReduceLROnPlateau on valid MAE instead (fit steps it once per
    epoch); it does not combine with a schedule or a warmup.

    Off by default: at the demo's 3 epochs a decay cost more than it settled (bench/DECISIONS.md).
    """
    from transformers import get_scheduler

    if tc.plateau_patience is not None:
        if _scheduled(tc):
            raise InputError("train.plateau_patience", "needs train.lr_schedule: constant and train.warmup_ratio: 0")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=tc.plateau_patience,
                                                          factor=tc.plateau_factor)
    if not _scheduled(tc):
        return None
    total = tc.epochs * math.ceil(n_train / tc.batch_size)
    return get_scheduler(tc.lr_schedule, opt, num_warmup_steps=round(tc.warmup_ratio * total),
                         num_training_steps=total)


def _base_fingerprint(cfg: Config, ds: PreparedDataset, device: torch.device, amp: bool) -> dict:
    # epochs only matters for resume when a schedule spans the run (its length sets the decay)
    skip = ("out_dir", "keep_checkpoints", "device", "amp") + (() if _scheduled(cfg.train) else ("epochs",))
    return {"train": {k: v for k, v in asdict(cfg.train).items() if k not in skip}, "device": device.type,
            "amp": amp, "data": config_fingerprint(ds.manifest), "n": len(ds),
            "text_encoder": dir_identity(cfg.psamf.encoder)}


def _train_run(cfg: Config, ds: PreparedDataset, run_name: str, tags: dict[str, Any], trial=None):
    """The stage's `train` run, opened once the inputs are checked, so that it spans the work:
    tokenizing, loading the encoders and the CLS_p table as well as the epochs."""
    if trial is not None:
        tags = {**tags, "trial": getattr(trial, "number", "")}
    # Not per tune trial: a sampler thread per short trial run slowed the demo's search (DECISIONS.md).
    return tracking.stage_run(cfg, "train", run_name=run_name, tags={**tags, "av_simulated": ds.av_simulated},
                              system_metrics=trial is None)


# ---------------------------------------------------------------------------- stages

def train_psamf(cfg: Config, *, trial=None, out_dir: str | Path | None = None,
                shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train PSA-MF (with cfg.psamf.ablation); see the module docstring. Returns the report:
    valid (best epoch) and test metrics in every convention, best_epoch, history, corpus,
    av_simulated, ablation, out_dir, model_dir (and more). `shared`: a dict kept across calls
    (a tune worker's trials) for what they have in common, the CLS_p table."""
    from psamf.models.psamf import CLS_P_KEY, PSAMF

    ds = load_split_data(cfg, SELECTION_SPLITS if trial is not None else SPLITS)
    check_personality_encoder(cfg)
    ablation = cfg.psamf.ablation
    personality = ablation != "no_personality"
    device = resolve_device(cfg.train.device)
    amp = bool(cfg.train.amp) and device.type == "cuda"
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    with _train_run(cfg, ds, f"train[{ablation}]", {"ablation": ablation, "model": "psamf"}, trial):
        tensors, tok_info = segment_tensors(cfg, ds, personality)
        audio_dim, visual_dim = int(tensors["audio"].shape[-1]), int(tensors["visual"].shape[-1])

        seed_everything(cfg.train.seed)
        try:
            model = PSAMF.from_config(cfg.psamf, audio_dim, visual_dim)
        except ValueError as e:
            raise InputError("psamf", str(e).splitlines()[0]) from None
        model.to(device)
        pers_identity = dir_identity(cfg.psamf.personality_encoder) if personality else None
        if model.personality_encoder is not None:
            tensors[CLS_P_KEY] = personality_cls_table(model, tensors, device, max(64, cfg.train.batch_size),
                                                       cache=shared, identity=pers_identity)

        def loss_parts(m: nn.Module, b: Batch):
            o = m(b)
            return o.total, o.losses()

        def forward(m: nn.Module, b: Batch) -> torch.Tensor:
            return m(b).pred

        fingerprint = {"kind": "psamf", "psamf": asdict(cfg.psamf), **_base_fingerprint(cfg, ds, device, amp),
                       "personality_encoder": pers_identity}
        pers = model.personality_encoder
        extra = {"audio_dim": audio_dim, "visual_dim": visual_dim,
                 "personality_tokenizer": (cfg.psamf.personality_encoder if tok_info["personality_tokenizer"] else None),
                 "encoder_configs": {"text": model.text.config.to_dict(),
                                     "personality": pers.config.to_dict() if pers is not None else None}}
        tokenizers = {"tokenizer": tok_info["tokenizer"], "personality_tokenizer": tok_info["personality_tokenizer"]}
        report = _run(cfg, kind="psamf", ds=ds, tensors=tensors, model=model, loss_parts=loss_parts,
                      forward=forward, device=device, amp=amp, out_dir=out, fingerprint=fingerprint,
                      save_extra=extra, tokenizers=tokenizers, trial=trial, run_name=f"train[{ablation}]")
    if report["pruned"]:
        raise _pruned(report)
    return report


def train_text_baseline(cfg: Config, *, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The text-only baseline on the same encoder, data, loop and metrics (L1 loss)."""
    from psamf.models.encoders import load_encoder

    ds = load_split_data(cfg)
    device = resolve_device(cfg.train.device)
    amp = bool(cfg.train.amp) and device.type == "cuda"
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg, "text_baseline")
    with _train_run(cfg, ds, "train[text_baseline]", {"model": "text_baseline"}):
        tensors, tok_info = segment_tensors(cfg, ds, personality=False)
        seed_everything(cfg.train.seed)
        model = TextRegressor(load_encoder(cfg.psamf.encoder), cfg.psamf.dropout).to(device)

        def loss_parts(m: nn.Module, b: Batch):
            l1 = nn.functional.l1_loss(m(b).float(), b["label"].float())
            return l1, {"l1": float(l1.detach())}

        fingerprint = {"kind": "text_baseline", "encoder": cfg.psamf.encoder, "max_len": cfg.psamf.max_len,
                       "dropout": cfg.psamf.dropout, **_base_fingerprint(cfg, ds, device, amp)}
        extra = {"dropout": cfg.psamf.dropout, "encoder_configs": {"text": model.encoder.config.to_dict()}}
        return _run(cfg, kind="text_baseline", ds=ds, tensors=tensors, model=model, loss_parts=loss_parts,
                    forward=lambda m, b: m(b), device=device, amp=amp, out_dir=out, fingerprint=fingerprint,
                    save_extra=extra, tokenizers={"tokenizer": tok_info["tokenizer"]}, trial=None,
                    run_name="train[text_baseline]")
