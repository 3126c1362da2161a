"""The personality corpus: ChaLearn First Impressions v2 (real) or a synthetic one in its format.

On disk, `<dir>/` (real data: `<shared_dir>/first-impressions-v2/`):

    annotation_{training,validation,test}.pkl     {trait: {clip_name: value in [0, 1]}}
    transcription_{training,validation,test}.pkl  {clip_name: text}

The traits are extraversion, neuroticism, agreeableness, conscientiousness, openness and
`interview` (an "invite to interview" score). Clip names look like `J4GQm9j0JZ0.003.mp4`;
the YouTube id (the speaker's video) is the part before the first dot. Real sizes:
6000 / 2000 / 2000 clips, 11 empty transcripts.

**Safe loading.** The pickles are protocol 2, written by Python 2. The annotation files
reference exactly two globals, `numpy.core.multiarray.scalar` and `numpy.dtype` (the
`interview` values are numpy float64 scalars, the rest plain floats); the transcriptions
reference none. `restricted_load` unpickles with `encoding='latin1'` through psamf's one
restricted unpickler (psamf.data.safe_pickle) with an allow-list of those two globals and nothing else; any other global, and any
truncated, corrupt or wrongly shaped file, becomes one `InputError` naming the file.
(`scalar` is further limited to plain numeric dtypes: numpy would otherwise hand back an
arbitrary object for dtype('O').)
A pickle re-saved by Python 3 + numpy 2 at protocol 2 references `_codecs.encode` and
`numpy._core.multiarray.scalar` and is refused: we accept the official format only.

**`neuroticism` is emotional STABILITY.** Despite its name, FI's `neuroticism` label is
higher for calmer, more stable people: ChaLearn's annotators compared clips on
"comfortable", which the organisers mapped to (emotional) stability, and the label
correlates about +0.80 with extraversion (true neuroticism correlates negatively).
We keep the column under its official name and never invert it silently; use
`stability(df)` (the same values, named `stability`) or `TRAIT_MEANING` where the
direction matters. See `NEUROTICISM_MEANS_STABILITY`.

**Other caveats.** The labels are *apparent* personality (raters' impressions) with a
strong halo (traits correlate 0.58-0.88 with each other). The official splits share
speakers (train and test have 1201 YouTube ids in common), so honest evaluation uses
`speaker_disjoint_split`, which regroups by YouTube id; the official split is kept in
`official_split`.

**Empty transcripts** (11 in the real data) are kept, not dropped: the frame has a
boolean `empty_text` column and `corpus_info(df)` counts them. A consumer that cannot use
an empty text (e.g. a text-only encoder's training set) decides for itself to drop them.

The synthetic corpus (`write_synthetic_personality_corpus`) is written byte-for-byte in
the official format (the same two numpy globals, Python-2 style byte-string keys) and
carries a learnable lexical signal about the traits; it is byte-identical per seed.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psamf.data.safe_pickle import _SCALAR, FI_GLOBALS
from psamf.data.safe_pickle import restricted_load as _safe_load
from psamf.errors import InputError
from psamf.io import atomic_dir

# --------------------------------------------------------------------------- constants

TRAITS = ("extraversion", "neuroticism", "agreeableness", "conscientiousness", "openness")
"""The Big Five as FI names them. NB: `neuroticism` here measures emotional STABILITY."""

LABELS = TRAITS + ("interview",)
"""Every label column the loader returns (Big Five + the interview score), as float."""

NEUROTICISM_MEANS_STABILITY = True
"""FI's `neuroticism` label is emotional stability: higher = calmer. Not inverted on load."""

TRAIT_MEANING = {
    "extraversion": "extraversion (higher = more outgoing)",
    "neuroticism": "emotional STABILITY despite the name (higher = calmer; "
                   "ChaLearn maps 'comfortable' to stability; r = +0.80 with extraversion)",
    "agreeableness": "agreeableness (higher = friendlier)",
    "conscientiousness": "conscientiousness (higher = more organised)",
    "openness": "openness to experience (higher = more curious)",
    "interview": "invite-to-interview score (higher = more likely)",
}

OFFICIAL_SPLITS = {"training": "train", "validation": "valid", "test": "test"}
"""File-name split -> the split name used in the frame (the names psamf uses everywhere)."""

SPLITS = ("train", "valid", "test")
FI_DIRNAME = "first-impressions-v2"

# The exact key order of the real annotation pickles (interview before openness).
_ANNOTATION_KEY_ORDER = ("extraversion", "neuroticism", "agreeableness", "conscientiousness",
                         "interview", "openness")

_CLIP_RE = re.compile(r"^([^.]+)\.(\d+)\.mp4$")

COLUMNS = ["clip_id", "youtube_id", "official_split", "text", *LABELS, "empty_text"]


def annotation_file(directory: str | Path, split: str) -> Path:
    """`split` is a file-name split: training, validation or test."""
    return Path(directory) / f"annotation_{split}.pkl"


def transcription_file(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"transcription_{split}.pkl"


def corpus_files(directory: str | Path) -> list[Path]:
    """The six files a corpus directory must hold, in a fixed order."""
    out = []
    for split in OFFICIAL_SPLITS:
        out += [annotation_file(directory, split), transcription_file(directory, split)]
    return out


def find_real_corpus(shared_dir: str | Path) -> Path | None:
    """`<shared_dir>/first-impressions-v2` if all six official files are there, else None."""
    d = Path(shared_dir) / FI_DIRNAME
    return d if all(p.is_file() for p in corpus_files(d)) else None


# --------------------------------------------------------------------------- safe unpickling

def restricted_load(path: str | Path) -> Any:
    """Unpickle `path` safely (see the module docstring); any problem -> one InputError."""
    return _safe_load(path, FI_GLOBALS)


# --------------------------------------------------------------------------- loading

def _check_clip(path: Path, clip: Any) -> str:
    if not isinstance(clip, str) or not _CLIP_RE.match(clip):
        raise InputError(path, f"clip name {clip!r} is not like 'J4GQm9j0JZ0.003.mp4'")
    return clip


def load_annotations(path: str | Path) -> dict[str, dict[str, float]]:
    """{trait: {clip: float}} from one annotation pickle, structure checked."""
    path = Path(path)
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise InputError(path, f"top level must be a dict {{trait: {{clip: value}}}}, got {type(obj).__name__}")
    missing = [t for t in LABELS if t not in obj]
    extra = sorted(str(k) for k in obj if k not in LABELS)
    if missing or extra:
        raise InputError(path, f"trait keys must be {', '.join(LABELS)}"
                               + (f"; missing {', '.join(missing)}" if missing else "")
                               + (f"; unexpected {', '.join(extra[:5])}" if extra else ""))
    out: dict[str, dict[str, float]] = {}
    clips: set[str] | None = None
    for trait in LABELS:
        values = obj[trait]
        if not isinstance(values, dict):
            raise InputError(path, f"{trait}: must be a dict {{clip: value}}, got {type(values).__name__}")
        col: dict[str, float] = {}
        for clip, v in values.items():
            _check_clip(path, clip)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (float, int, np.floating, np.integer)):
                raise InputError(path, f"{trait}/{clip}: value must be a number, got {type(v).__name__}")
            f = float(v)
            if not (0.0 <= f <= 1.0):  # also rejects NaN
                raise InputError(path, f"{trait}/{clip}: value {f!r} outside [0, 1]")
            col[clip] = f
        if clips is None:
            clips = set(col)
        elif set(col) != clips:
            odd = sorted(set(col) ^ clips)[0]
            raise InputError(path, f"{trait}: clip set differs from {LABELS[0]}'s (e.g. {odd})")
        out[trait] = col
    return out


def load_transcriptions(path: str | Path) -> dict[str, str]:
    """{clip: text} from one transcription pickle, structure checked."""
    path = Path(path)
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise InputError(path, f"top level must be a dict {{clip: text}}, got {type(obj).__name__}")
    for clip, text in obj.items():
        _check_clip(path, clip)
        if not isinstance(text, str):
            raise InputError(path, f"{clip}: transcript must be a string, got {type(text).__name__}")
    return obj


def load_personality_corpus(directory: str | Path) -> pd.DataFrame:
    """Load the six pickles into one frame, columns `COLUMNS`, one row per clip.

    Rows are ordered by official split (train, valid, test), then clip_id. Label columns are
    float64 in [0, 1]; `neuroticism` is emotional stability (see the module docstring).
    `empty_text` flags clips whose transcript is empty or whitespace (kept, not dropped).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "personality corpus directory not found")
    for p in corpus_files(directory):
        if not p.is_file():
            raise InputError(p, "file not found (a First Impressions v2 corpus needs "
                                "annotation_* and transcription_* for training, validation, test)")
    frames = []
    seen: dict[str, str] = {}
    for file_split, split in OFFICIAL_SPLITS.items():
        apath, tpath = annotation_file(directory, file_split), transcription_file(directory, file_split)
        ann = load_annotations(apath)
        texts = load_transcriptions(tpath)
        clips = sorted(ann[LABELS[0]])
        if set(clips) != set(texts):
            only_a = sorted(set(clips) - set(texts))
            only_t = sorted(set(texts) - set(clips))
            detail = (f"{len(only_a)} annotated clip(s) without a transcript (e.g. {only_a[0]})" if only_a
                      else f"{len(only_t)} transcript(s) without annotations (e.g. {only_t[0]})")
            raise InputError(tpath, f"clips differ from {apath.name}: {detail}")
        for c in clips:
            if c in seen:
                raise InputError(apath, f"clip {c} is also in the {seen[c]} split")
            seen[c] = split
        frame = pd.DataFrame({
            "clip_id": clips,
            "youtube_id": [c.split(".", 1)[0] for c in clips],
            "official_split": split,
            "text": [texts[c] for c in clips],
        })
        for trait in LABELS:
            frame[trait] = np.array([ann[trait][c] for c in clips], dtype=np.float64)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["empty_text"] = df["text"].str.strip().eq("").to_numpy(dtype=bool)
    return df[COLUMNS]


def corpus_info(df: pd.DataFrame) -> dict[str, Any]:
    """Counts a report or validation step wants: clips/speakers per split, empty texts, overlap."""
    info: dict[str, Any] = {
        "clips": int(len(df)),
        "youtube_ids": int(df["youtube_id"].nunique()),
        "empty_texts": int(df["empty_text"].sum()) if "empty_text" in df else None,
        "empty_text_clips": sorted(df.loc[df["empty_text"], "clip_id"]) if "empty_text" in df else [],
        "neuroticism_means": "emotional stability (higher = calmer)",
    }
    for col in ("official_split", "split"):
        if col not in df:
            continue
        groups = {s: set(df.loc[df[col] == s, "youtube_id"]) for s in SPLITS}
        info[col] = {
            "clips": {s: int((df[col] == s).sum()) for s in SPLITS},
            "youtube_ids": {s: len(groups[s]) for s in SPLITS},
            "shared_youtube_ids": {f"{a}&{b}": len(groups[a] & groups[b])
                                   for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]},
        }
    return info


def stability(df: pd.DataFrame) -> pd.Series:
    """FI's `neuroticism` column under its honest name: emotional stability, higher = calmer.

    The same values, not inverted (1 - x would be the neuroticism estimate, if one is wanted).
    """
    return df["neuroticism"].rename("stability")


# --------------------------------------------------------------------------- speaker-disjoint split

def _speaker_key(seed: int, youtube_id: str) -> bytes:
    return hashlib.sha256(f"psamf-fi-split:{seed}:{youtube_id}".encode()).digest()


def speaker_disjoint_split(df: pd.DataFrame, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                           seed: int = 0) -> pd.DataFrame:
    """A copy of `df` with a `split` column (train/valid/test) such that no youtube_id is in two splits.

    Speakers (YouTube ids) are ordered by SHA-256 of (seed, id) - deterministic for a seed and
    independent of row order and numpy version - then cut so each split gets about its
    `fractions` share of *clips* (each speaker goes to the split its middle clip falls in).
    Every split with a positive fraction gets at least one speaker.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(not np.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise InputError("fractions", f"need three non-negative train/valid/test fractions summing to 1, got {fractions!r}")
    if "youtube_id" not in df:
        raise InputError("personality corpus", "no youtube_id column to split by")
    counts = df.groupby("youtube_id", sort=True).size()
    ids = sorted(counts.index, key=lambda y: (_speaker_key(seed, y), y))
    need = sum(f > 0 for f in fr)
    if len(ids) < need:
        raise InputError("personality corpus", f"{len(ids)} speaker(s) cannot fill {need} non-empty splits")
    n = counts.loc[ids].to_numpy(dtype=np.float64)
    mid = (np.cumsum(n) - n / 2) / n.sum()
    bounds = np.cumsum(fr)[:2]
    which = np.searchsorted(bounds, mid, side="right")
    which = np.minimum(which, 2)
    # Never leave a split with a positive fraction empty: move in the speaker nearest to its
    # share of the cumulative range, taken from a split that has more than one speaker.
    lo = np.concatenate([[0.0], bounds])
    hi = np.concatenate([bounds, [1.0]])
    for k in range(3):
        if fr[k] > 0 and not (which == k).any():
            centre = (lo[k] + hi[k]) / 2
            for j in np.argsort(np.abs(mid - centre), kind="stable"):
                if (which == which[j]).sum() > 1:
                    which[j] = k
                    break
    assign = dict(zip(ids, (SPLITS[w] for w in which)))
    out = df.copy()
    out["split"] = df["youtube_id"].map(assign).astype(str)
    return out


# --------------------------------------------------------------------------- synthetic corpus

# Per-trait word lists: (high, low). For `neuroticism` "high" is STABILITY (calm), as in FI.
TRAIT_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "extraversion": (
        ("party", "friends", "exciting", "love", "talk", "fun", "amazing", "awesome", "crazy",
         "guys", "everyone", "people", "loud", "dance", "energy", "social"),
        ("quiet", "alone", "home", "read", "myself", "shy", "private", "book", "stay", "silence",
         "introvert", "tired", "indoors", "rarely", "reserved", "sleep"),
    ),
    "neuroticism": (  # = stability
        ("calm", "relaxed", "fine", "okay", "steady", "easy", "comfortable", "peaceful",
         "confident", "chill", "balanced", "secure"),
        ("worried", "nervous", "anxious", "stress", "scared", "upset", "afraid", "panic",
         "awkward", "overwhelmed", "insecure", "frustrated"),
    ),
    "agreeableness": (
        ("thank", "kind", "help", "nice", "appreciate", "sweet", "support", "care", "please",
         "grateful", "family", "together"),
        ("hate", "annoying", "stupid", "whatever", "rude", "argue", "complain", "ugh", "wrong",
         "blame", "fight", "mad"),
    ),
    "conscientiousness": (
        ("plan", "work", "organized", "schedule", "finish", "careful", "goal", "prepared",
         "study", "responsible", "routine", "detail"),
        ("lazy", "forgot", "late", "messy", "mess", "random", "skip", "procrastinate", "later",
         "sloppy", "lost", "distracted"),
    ),
    "openness": (
        ("art", "travel", "creative", "ideas", "music", "imagine", "curious", "explore",
         "culture", "new", "different", "design"),
        ("usual", "normal", "same", "simple", "traditional", "typical", "familiar", "standard",
         "regular", "plain", "ordinary", "basic"),
    ),
}

FILLER_WORDS = (
    "so", "um", "like", "yeah", "i", "you", "the", "a", "and", "to", "it", "that", "this", "is",
    "was", "just", "really", "video", "today", "know", "think", "going", "get", "have", "do",
    "my", "about", "what", "with", "but", "we", "they", "thing", "things", "time", "right",
    "well", "actually", "channel", "gonna", "some", "one", "there", "here", "then", "because",
    "if", "of", "in", "on", "for", "be", "been", "me", "your", "all", "up", "out", "can", "want",
    "see", "said", "week", "day", "guess", "also", "lot", "pretty", "back", "first",
)

_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SYNTH_VERSION = 1
SYNTHETIC_MARKER = "synthetic.json"
_SIGNAL_RATE = 0.35       # share of words drawn from the trait lists
_HALO = 0.6               # weight of the shared "halo" factor in every trait (traits correlate ~0.7)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes what Python 2 + numpy 1 wrote for FI.

    bytes -> SHORT_BINSTRING/BINSTRING (a Python 2 `str`; read back as str with latin1),
    numpy float64 -> `numpy.core.multiarray.scalar(dtype('f8'), <8 raw bytes>)`.
    The pure-Python pickler memoizes by object identity, so the output depends only on
    the data: same data, same bytes.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    _F8 = np.dtype("<f8")

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.float64:
            return _SCALAR, (self._F8, obj.tobytes())
        if obj is self._F8:
            return np.dtype, (b"f8", 0, 1), (3, b"<", None, None, None, -1, -1, 0)
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        if obj is np.dtype:
            self.write(pickle.GLOBAL + b"numpy\ndtype\n")
            self.memoize(obj)
            return
        raise pickle.PicklingError(f"refusing to write global {obj!r}: not in the FI format")


def _dump_py2(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _q107(x: np.ndarray) -> np.ndarray:
    """FI labels are multiples of 1/107; quantising also keeps the bytes platform-stable."""
    return np.round(np.clip(x, 0.0, 1.0) * 107.0) / 107.0


def _synth_transcript(rng: np.random.Generator, labels: dict[str, float]) -> str:
    n_words = int(rng.integers(20, 65))
    words: list[str] = []
    for _ in range(n_words):
        if rng.random() < _SIGNAL_RATE:
            trait = TRAITS[int(rng.integers(len(TRAITS)))]
            # Stretch labels (mostly 0.15-0.85) so the word choice tracks them clearly.
            p_high = min(max(0.5 + 1.4 * (labels[trait] - 0.5), 0.03), 0.97)
            high, low = TRAIT_WORDS[trait]
            pool = high if rng.random() < p_high else low
            words.append(pool[int(rng.integers(len(pool)))])
        else:
            words.append(FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))])
    # Sentences of 5-14 words, capitalised, with a full stop; "i" -> "I".
    out: list[str] = []
    i = 0
    while i < len(words):
        k = int(rng.integers(5, 15))
        sent = ["I" if w == "i" else w for w in words[i:i + k]]
        sent[0] = sent[0][:1].upper() + sent[0][1:]
        out.append(" ".join(sent) + ".")
        i += k
    return " ".join(out)


def write_synthetic_personality_corpus(out_dir: str | Path, n_clips: int = 600, seed: int = 0) -> dict[str, Any]:
    """Write a synthetic First Impressions v2 corpus to `out_dir` in the official format.

    - Speakers get 1-6 clips each, named `<11-char id>.<nnn>.mp4`; clips are shuffled and cut
      60/20/20 into training/validation/test, so (as in the real data) speakers are shared
      across the official splits.
    - Per speaker, latent traits in [0, 1] = a shared halo factor plus a trait-specific one
      (inter-trait r ~ 0.7, like FI's 0.58-0.88); per clip a small jitter; labels are multiples
      of 1/107 like FI's. `interview` follows the trait mean. `neuroticism` is STABILITY,
      exactly as in FI (high = calm words).
    - Transcripts mix neutral filler with per-trait high/low word lists (`TRAIT_WORDS`), the
      high list drawn with a probability rising with the clip's label, so a TF-IDF ridge
      learns every trait. About 0.1% of transcripts (at least one) are empty, like FI's.
    - Pickles are protocol 2 as Python 2 wrote them: `interview` values are numpy float64
      scalars (the two numpy globals appear), the other traits plain floats, transcripts str.
    - Also writes `synthetic.json` (seed, counts, generator version) so reports can say the
      corpus is synthetic; loaders ignore it.

    Byte-identical for the same (n_clips, seed) (numpy.random.default_rng(seed) plus exact
    arithmetic only). The directory is replaced atomically; it must hold only a previous
    corpus (the six pickles and synthetic.json), or be absent, so nothing else is destroyed.
    Returns an info dict (paths, counts, SHA-256 of each file).
    """
    out_dir = Path(out_dir)
    if isinstance(n_clips, bool) or not isinstance(n_clips, (int, np.integer)) or n_clips < 5:
        raise InputError("n_clips", f"need an integer >= 5 (one clip per split at least), got {n_clips!r}")
    n_clips = int(n_clips)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(out_dir, "exists and is not a directory")
        ours = {p.name for p in corpus_files(out_dir)} | {SYNTHETIC_MARKER}
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if foreign:
            raise InputError(out_dir, f"holds other files ({', '.join(foreign[:3])}); refusing to replace it")
    rng = np.random.default_rng(seed)

    # Speakers and their clips.
    per_speaker: list[int] = []
    while sum(per_speaker) < n_clips:
        per_speaker.append(int(rng.integers(1, 7)))
    per_speaker[-1] -= sum(per_speaker) - n_clips
    n_speakers = len(per_speaker)
    ids: list[str] = []
    taken: set[str] = set()
    while len(ids) < n_speakers:
        yid = "".join(_ID_ALPHABET[int(i)] for i in rng.integers(0, len(_ID_ALPHABET), size=11))
        if yid not in taken:
            taken.add(yid)
            ids.append(yid)

    halo = rng.random(n_speakers)
    latent = {t: 0.15 + 0.7 * (_HALO * halo + (1 - _HALO) * rng.random(n_speakers)) for t in TRAITS}

    clips: list[str] = []
    owner: list[int] = []
    for s, (yid, k) in enumerate(zip(ids, per_speaker)):
        for j in range(k):
            clips.append(f"{yid}.{j:03d}.mp4")
            owner.append(s)
    own = np.array(owner)
    labels = {t: _q107(latent[t][own] + 0.08 * (rng.random(n_clips) - 0.5)) for t in TRAITS}
    trait_mean = sum(labels[t] for t in TRAITS) / len(TRAITS)
    labels["interview"] = _q107(trait_mean + 0.1 * (rng.random(n_clips) - 0.5))

    texts = [_synth_transcript(rng, {t: float(labels[t][i]) for t in TRAITS}) for i in range(n_clips)]
    n_empty = max(1, n_clips // 1000)
    for i in rng.choice(n_clips, size=n_empty, replace=False):
        texts[int(i)] = ""

    order = rng.permutation(n_clips)
    n_train = int(round(0.6 * n_clips))
    n_valid = int(round(0.2 * n_clips))
    parts = {"training": order[:n_train], "validation": order[n_train:n_train + n_valid],
             "test": order[n_train + n_valid:]}

    keys = [c.encode("ascii") for c in clips]  # Python 2 str keys, shared across traits (memoized)
    blobs: dict[str, bytes] = {}
    for split, idx in parts.items():
        ann = {}
        for trait in _ANNOTATION_KEY_ORDER:
            vals = labels[trait]
            if trait == "interview":
                ann[trait.encode()] = {keys[i]: np.float64(vals[i]) for i in idx}
            else:
                ann[trait.encode()] = {keys[i]: float(vals[i]) for i in idx}
        blobs[annotation_file(out_dir, split).name] = _dump_py2(ann)
        blobs[transcription_file(out_dir, split).name] = _dump_py2({keys[i]: texts[i] for i in idx})

    marker = {
        "corpus": "synthetic-first-impressions-v2",
        "generator_version": _SYNTH_VERSION,
        "seed": int(seed),
        "n_clips": n_clips,
        "n_speakers": n_speakers,
        "clips": {OFFICIAL_SPLITS[s]: int(len(idx)) for s, idx in parts.items()},
        "empty_transcripts": n_empty,
        "note": "neuroticism is emotional stability, as in the real corpus",
    }
    blobs[SYNTHETIC_MARKER] = (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()

    with atomic_dir(out_dir) as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
    return {
        **marker,
        "dir": str(out_dir),
        "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in sorted(blobs.items())},
    }
