"""The one training loop: epochs, early stopping, atomic per-epoch checkpoints, exact resume.

Both models train through `fit`. Resuming after `kill -9` must end with exactly the
metrics of an uninterrupted run on CPU, so a checkpoint holds everything that decides
the next epoch: weights, optimizer state, the global torch/numpy/python RNG states (dropout),
the history and the early-stopping counters. Batch order is drawn from a generator
seeded with (seed, epoch), so it does not depend on where a run was resumed.

Optimizers: MulT uses Adam(fused=True), one kernel instead of a Python loop over its tensors
(it rounds differently in the last bit); PSA-MF and the personality encoder use foreach=True,
bit-identical to the default. Timings: bench/DECISIONS.md.

Also the helpers every training stage shares: device choice, bf16 autocast, tokenizing and
trimming text batches, and a batch progress bar driven from inside a loss function.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from psamf.errors import InputError
from psamf.io import atomic_path
from psamf.metrics import DivergedError, NonFiniteError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int = 0  # epochs already done when this call started


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_fingerprint(obj: Any) -> str:
    """A checkpoint only resumes a run with the same settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(tensors: dict[str, Any]) -> str:
    """A content hash of named arrays/tensors: a resume must not continue on other data."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        a = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
        h.update(f"{k}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def batches(data: dict[str, torch.Tensor], batch_size: int, shuffle: bool, seed: int = 0,
            epoch: int = 0) -> Iterable[Batch]:
    """Minibatches of a dict of equal-length tensors; the order depends only on (seed, epoch)."""
    n = len(next(iter(data.values())))
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def snapshot(model: nn.Module) -> dict[str, Any]:
    """A detached copy of the state_dict (tensors cloned; extra state such as a vocab copied)."""
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in model.state_dict().items()}


def _save(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: dict[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    evaluate: Callable[[nn.Module], dict[str, float]],
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    ckpt_dir: str | Path | None = None,
    fingerprint: str = "",
    monitor: str = "valid_mae",
    grad_clip: float | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "train",
    should_stop: Callable[[int, dict[str, float]], bool] | None = None,
    scheduler: Any | None = None,
    store: Any | None = None,
    suspects: dict[str, Any] | None = None,
) -> FitResult:
    """Train with early stopping on `evaluate()[monitor]` (lower is better).

    With `ckpt_dir`, `last.pt` is written atomically after every epoch and `best.pt` holds
    the best weights; a later call with the same fingerprint resumes from `last.pt`.
    At the end the model holds the best weights. `should_stop` lets a caller (an Optuna
    pruner) end the run after an epoch. `scheduler` (a torch LR scheduler) steps after every
    optimizer step, except ReduceLROnPlateau, which steps once per epoch on `evaluate()[monitor]`;
    its state is checkpointed with the optimizer's. `store` (a
    psamf.checkpoints.CheckpointStore) mirrors every checkpoint to a place that outlives the task.

    A run whose training loss or predictions go non-finite raises DivergedError naming `desc`, the
    epoch and `suspects` (the settings most likely at fault: learning rates, loss weights), after
    removing its checkpoints: resuming a diverged run would only diverge again, and nothing of it
    is left behind.
    """
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    if ckpt and store is not None:
        store.pull(ckpt)  # a retried pod or a `dvc repro` starts with an empty ckpt_dir
    start_epoch, best, best_epoch, bad_epochs, history = 0, math.inf, -1, 0, []
    best_state = snapshot(model)
    stopped = False
    if ckpt and (ckpt / "last.pt").is_file():
        state = torch.load(ckpt / "last.pt", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
            bad_epochs, history, stopped = state["bad_epochs"], state["history"], state["stopped"]
            best_state = torch.load(ckpt / "best.pt", weights_only=False) if (ckpt / "best.pt").is_file() else best_state
            log.info("resuming %s from epoch %d", desc, start_epoch)
        else:
            log.warning("%s: checkpoint in %s is for other settings; starting over", desc, ckpt)
    resumed_from = start_epoch
    per_epoch = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    for epoch in tqdm(range(start_epoch, epochs), desc=desc, unit="epoch", leave=False,
                      initial=start_epoch, total=epochs):
        if stopped:
            break
        model.train()
        total, count = 0.0, 0
        for batch in batches(train_data, batch_size, shuffle=True, seed=seed, epoch=epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None and not per_epoch:
                scheduler.step()
            n = len(next(iter(batch.values())))
            total += float(loss.detach()) * n
            count += n
        model.eval()
        when = f"at epoch {epoch + 1} of {epochs}"
        if not math.isfinite(total):
            _drop_checkpoints(ckpt, store)
            raise DivergedError(desc, when, f"the training loss is {total / max(count, 1)}", suspects or {})
        try:
            with torch.no_grad():
                metrics = {"train_loss": total / max(count, 1), **evaluate(model)}
        except NonFiniteError as e:
            _drop_checkpoints(ckpt, store)
            raise DivergedError(desc, when, str(e), suspects or {}) from None
        history.append({"epoch": epoch, **metrics})
        score = metrics[monitor]
        if per_epoch:
            scheduler.step(score)
        if score < best:
            best, best_epoch, bad_epochs = score, epoch, 0
            best_state = snapshot(model)
            if ckpt:
                _save(ckpt / "best.pt", best_state)
                if store is not None:
                    store.push(ckpt / "best.pt")
        else:
            bad_epochs += 1
        stopped = bad_epochs >= patience or bool(should_stop and should_stop(epoch, metrics))
        if ckpt:
            _save(ckpt / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                                     "rng": _rng_state(), "epoch": epoch, "best": best,
                                     "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                                     "history": history, "stopped": stopped, "fingerprint": fingerprint})
            if store is not None:
                store.push(ckpt / "last.pt")
        if on_epoch:  # after the checkpoint: a tracking outage never costs an epoch
            on_epoch(epoch, metrics)
    model.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch, best_score=best, history=history, stopped_early=stopped,
                     resumed_from=resumed_from)


def _drop_checkpoints(ckpt: Path | None, store: Any | None) -> None:
    """A diverged run's checkpoints: fit's own files, the dir if that leaves it empty, the mirror."""
    if ckpt is not None:
        for name in ("last.pt", "best.pt"):
            (ckpt / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ckpt.rmdir()  # only when empty: a caller's ckpt_dir may hold its own outputs
    if store is not None:
        store.discard()


# Token columns of a text batch; the personality encoder's copy carries this prefix.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
PERSONALITY_PREFIX = "personality_"


def resolve_device(name: str) -> torch.device:
    """train.device (one of its config.CHOICES): auto -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():  # the machine's, not the config's fault: checked here
        raise InputError("train.device", "cuda requested but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when amp; a no-op context otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def tokenize(tokenizer, texts: list[str], max_len: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded ids/mask (/token types) for all texts at once, padded to the longest (<= max_len)."""
    enc = tokenizer([str(t) for t in texts], padding="longest", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return {f"{prefix}{k}": enc[k].long() for k in TEXT_KEYS if k in enc}


def trim_padding(batch: Batch) -> Batch:
    """Drop token columns that are padding in every row of the batch (for both token groups)."""
    out = dict(batch)
    for prefix in ("", PERSONALITY_PREFIX):
        am = batch.get(f"{prefix}attention_mask")
        if am is None:
            continue
        used = am.bool().any(0).nonzero()
        n = int(used[-1]) + 1 if len(used) else 1
        if n < am.shape[1]:
            for k in TEXT_KEYS:
                if f"{prefix}{k}" in out:
                    out[f"{prefix}{k}"] = out[f"{prefix}{k}"][:, :n]
    return out


class BatchProgress:
    """A per-epoch batch bar driven from inside a loss function (fit shows only an epoch bar)."""

    def __init__(self, n: int, batch_size: int, desc: str):
        self.total = max(1, math.ceil(n / batch_size))
        self.desc = desc
        self.bar = None

    def step(self) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.desc, unit="batch", leave=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@torch.no_grad()
def predict(model: nn.Module, data: dict[str, torch.Tensor], forward: Callable[[nn.Module, Batch], torch.Tensor],
            batch_size: int = 256) -> np.ndarray:
    """Predictions as a numpy array; detached per batch so no graph outlives its batch."""
    model.eval()
    outs = [forward(model, b).detach().float().cpu() for b in batches(data, batch_size, shuffle=False)]
    return torch.cat(outs).numpy() if outs else np.zeros(0, dtype=np.float32)


def discard_checkpoints(ckpt_dir: str | Path, store, keep: bool) -> None:
    """After a finished run: its local checkpoint dir and the durable store's copy go, unless
    `keep` (the stage's keep_checkpoints)."""
    if keep:
        return
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if store is not None:
        store.discard()
