"""Personalized MulT, step 1: MulT + User Adapter pretrained on every speaker but the held-out one.

    pretrain(cfg, held_out)  70/30 train/valid by segment, early stopping on valid MAE; resumable;
                             writes <pretrain.out_dir>/<corpus>/<held_out>/model.pt

Also the MulT inputs (prepared arrays + frozen-encoder text features) that fine-tuning reuses.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from psamf import tracking
from psamf.checkpoints import store_for
from psamf.config import Config
from psamf.data.prepared import PreparedDataset, load_prepared
from psamf.data.text_features import text_features
from psamf.errors import InputError
from psamf.io import write_json
from psamf.metrics import regression_metrics
from psamf.models.mult import MulT
from psamf.models.user_adapter import UserVocab
from psamf.training import Batch, config_fingerprint, fit, predict, seed_everything, tensor_digest



log = logging.getLogger(__name__)


def mult_inputs(cfg: Config) -> tuple[PreparedDataset, dict[str, torch.Tensor], str]:
    """The prepared dataset plus its MulT tensors (text features computed/cached once)."""
    ds = load_prepared(cfg.data.prepared_path)
    text, text_mask, source = text_features(cfg, ds)
    tensors = {
        "text": torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32)),
        "audio": torch.from_numpy(ds.arrays["audio"]),
        "visual": torch.from_numpy(ds.arrays["visual"]),
        "text_mask": torch.from_numpy(text_mask.astype(bool)),
        "audio_mask": torch.from_numpy(ds.arrays["audio_mask"]),
        "visual_mask": torch.from_numpy(ds.arrays["visual_mask"]),
        "label": torch.from_numpy(ds.segments["label"].to_numpy(np.float32)),
    }
    # A segment whose modality has no frame at all would leave MulT nothing to attend to.
    for m in ("text", "audio", "visual"):
        empty = ~tensors[f"{m}_mask"].any(1)
        tensors[f"{m}_mask"][empty, 0] = True
    return ds, tensors, source


def take(tensors: dict[str, torch.Tensor], idx: np.ndarray, users: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out = {k: v[torch.as_tensor(idx, dtype=torch.long)] for k, v in tensors.items()}
    if users is not None:
        out["user"] = users
    return out


def forward(model: MulT, b: Batch) -> torch.Tensor:
    return model(b["text"], b["audio"], b["visual"], b.get("user"), b["text_mask"], b["audio_mask"], b["visual_mask"])


def l1_loss(model: MulT, b: Batch) -> torch.Tensor:
    return nn.functional.l1_loss(forward(model, b), b["label"])


def build_model(cfg: Config, tensors: dict[str, torch.Tensor], n_users: int) -> MulT:
    return MulT.from_config(cfg.mult, cfg.user_adapter, tensors["text"].shape[-1], tensors["audio"].shape[-1],
                            tensors["visual"].shape[-1], n_users)


def pretrain_dir(cfg: Config, held_out: str) -> Path:
    return Path(cfg.pretrain.out_dir) / cfg.data.corpus / held_out


def check_user(ds: PreparedDataset, user: str) -> None:
    if user not in set(ds.segments["speaker_id"]):
        raise InputError("--user", f"speaker {user!r} is not in the {ds.manifest.get('corpus')} corpus")


def pretrain(cfg: Config, held_out: str, on_epoch=None, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train MulT + User Adapter on every speaker but `held_out` (and `exclude`); resumable;
    writes model.pt."""
    pc = cfg.pretrain
    ds, tensors, source = mult_inputs(cfg)
    check_user(ds, held_out)
    out = pretrain_dir(cfg, held_out)
    keep = np.flatnonzero(~ds.segments["speaker_id"].isin([held_out, *exclude]).to_numpy())
    rng = np.random.default_rng(pc.seed)
    perm = rng.permutation(keep)
    n_valid = int(round(len(perm) * pc.valid_frac))
    valid_idx, train_idx = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    vocab = UserVocab(ds.segments["speaker_id"].iloc[keep])
    users = vocab.encode(ds.segments["speaker_id"].tolist())
    train = take(tensors, train_idx, users[train_idx])
    valid = take(tensors, valid_idx, users[valid_idx])
    seed_everything(pc.seed)
    model = build_model(cfg, tensors, len(vocab))
    opt = torch.optim.Adam(model.parameters(), lr=pc.lr, fused=True)

    def evaluate(m: MulT) -> dict[str, float]:
        p = predict(m, valid, forward)
        met = regression_metrics(p, valid["label"].numpy())
        return {"valid_mae": met["mae"], "valid_corr": met["corr"], "valid_non0_acc2": met["non0_acc2"]}

    # out_dir is not a setting: a retried pod resumes into a new output dir
    fp = config_fingerprint({"mult": asdict(cfg.mult), "ua": asdict(cfg.user_adapter),
                             "pretrain": {k: v for k, v in asdict(pc).items() if k != "out_dir"}, "seq_len": cfg.data.seq_len, "held_out": held_out,
                             **({"exclude": sorted(exclude)} if exclude else {}), "text": source,
                             "n": len(train_idx), "data": tensor_digest(tensors)})
    store = store_for(cfg, "pretrain", fp)
    with tracking.stage_run(cfg, "pretrain", f"pretrain[{held_out}]",
                            {"loo_user": held_out, "av_simulated": ds.av_simulated, "text_features": source}):
        log_epoch = tracking.epoch_logger()
        result = fit(model, opt, train, l1_loss, evaluate, epochs=pc.epochs, batch_size=pc.batch_size,
                     patience=pc.patience, seed=pc.seed, ckpt_dir=out, fingerprint=fp, grad_clip=pc.grad_clip,
                     on_epoch=on_epoch or log_epoch, desc=f"pretrain[{held_out}]", store=store,
                     suspects={"pretrain.lr": pc.lr, "pretrain.grad_clip": pc.grad_clip})
        tracking.log_metrics({"best_valid_mae": result.best_score, "best_epoch": result.best_epoch})
    torch.save({"state_dict": model.state_dict(), "users": vocab.to_list(), "text_source": source,
                "dims": {m: int(tensors[m].shape[-1]) for m in ("text", "audio", "visual")}},
               out / "model.tmp")
    (out / "model.tmp").replace(out / "model.pt")
    report = {"held_out": held_out, "corpus": cfg.data.corpus, "av_simulated": ds.av_simulated,
              "text_features": source, "n_train": len(train_idx), "n_valid": len(valid_idx),
              "best_epoch": result.best_epoch, "best_valid_mae": result.best_score,
              "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
              "history": result.history, "valid": result.history[result.best_epoch] if result.history else {}}
    write_json(out / "metrics.json", report)
    if store is not None:  # model.pt is written: a retry from here on needs no checkpoint
        store.discard()
    return report


def load_pretrained(cfg: Config, held_out: str, tensors: dict[str, torch.Tensor]) -> tuple[MulT, UserVocab]:
    path = pretrain_dir(cfg, held_out) / "model.pt"
    if not path.is_file():
        raise InputError(path, f"no pretrained model; run `psamf pretrain --held-out {held_out}` first")
    state = torch.load(path, weights_only=False)
    vocab = UserVocab.from_list(state["users"])
    model = build_model(cfg, tensors, len(vocab))
    model.load_state_dict(state["state_dict"])
    return model.eval(), vocab
