"""Text features for MulT: [N, T, D] sequences aligned to the same T as audio/visual.

- If the corpus directory has the SDK's word vectors (`<PREFIX>_TimestampedWordVectors.csd`),
  they are cut to each segment's interval and pooled/padded like the other modalities.
- With `text_features.encoder: file`, a pickle corpus's own text features (MMSA's `text`, MulT's
  GloVe `text`), which ingest pooled/padded to T (`FILE_TEXT` in the prepared arrays).
- Otherwise the frozen pre-trained encoder (`text_features.encoder`, default the offline
  MiniLM) embeds each segment's words; its token states, truncated/padded to T, are the
  sequence. Computed once and cached on disk, keyed by the encoder, T and the texts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from psamf.config import Config
from psamf.data.align import frames_in, pool_or_pad
from psamf.data.csd import read_csd
from psamf.data.layout import PREFIX
from psamf.data.prepared import FILE_TEXT, PreparedDataset
from psamf.io import atomic_path

BATCH = 64


def word_vectors_path(cfg: Config) -> Path | None:
    """The SDK's word vectors for an SDK-format corpus; None otherwise (a pickle corpus has no
    segment times to cut them with)."""
    if cfg.data.format != "sdk" or cfg.data.corpus not in PREFIX:
        return None
    name = f"{PREFIX[cfg.data.corpus]}_TimestampedWordVectors.csd"
    path = cfg.data.sdk_path / name
    return path if path.is_file() else None


def from_word_vectors(path: Path, ds: PreparedDataset, T: int) -> tuple[np.ndarray, np.ndarray]:
    seq = read_csd(path, set(ds.segments["video_id"]))
    feats, masks = [], []
    for vid, start, end in ds.segments[["video_id", "start", "end"]].itertuples(index=False):
        f, iv = seq.data[vid]
        x = np.nan_to_num(f[frames_in(iv, start, end)], nan=0.0, posinf=0.0, neginf=0.0)
        pooled, mask = pool_or_pad(x, T)
        feats.append(pooled)
        masks.append(mask)
    return np.stack(feats), np.stack(masks)


def cache_key(encoder: str, T: int, texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"encoder": encoder, "T": T}).encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:24]


def encode_texts(encoder: str, texts: list[str], T: int) -> tuple[np.ndarray, np.ndarray]:
    """Frozen encoder token states: [N, T, hidden] float32 and [N, T] attention mask."""
    import torch

    from psamf.models.encoders import load_encoder, load_tokenizer

    tok, model = load_tokenizer(encoder), load_encoder(encoder).eval()
    out, masks = [], []
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), BATCH), desc="text features", unit="batch", leave=False):
            enc = tok(texts[i:i + BATCH], padding="max_length", truncation=True, max_length=T,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state * enc["attention_mask"][..., None]
            out.append(h.float().numpy())
            masks.append(enc["attention_mask"].bool().numpy())
    return np.concatenate(out), np.concatenate(masks)


def text_features(cfg: Config, ds: PreparedDataset) -> tuple[np.ndarray, np.ndarray, str]:
    """(features [N,T,D], mask [N,T], source) for the prepared dataset, cached."""
    T = cfg.data.seq_len
    if cfg.text_features.encoder == "file":
        if FILE_TEXT not in ds.arrays:
            from psamf.errors import InputError

            raise InputError("text_features.encoder", "file: the prepared corpus has no text features of its own "
                                                      "(only an MMSA or MulT pickle with a `text` array has them)")
        return ds.arrays[FILE_TEXT], ds.arrays[FILE_TEXT + "_mask"], f"file:{ds.manifest.get('format', '?')}"
    wv = word_vectors_path(cfg)
    if wv is not None:
        f, m = from_word_vectors(wv, ds, T)
        return f, m, f"sdk:{wv.name}"
    texts = ds.segments["text"].tolist()
    encoder = cfg.text_features.encoder
    path = Path(cfg.text_features.cache_dir) / f"{cache_key(encoder, T, texts)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["features"], z["mask"], f"encoder:{encoder}"
    feats, mask = encode_texts(encoder, texts, T)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, features=feats, mask=mask)
    return feats, mask, f"encoder:{encoder}"
