"""First Impressions v2: safe unpickling, loading, speaker-disjoint splits, the synthetic corpus."""
from __future__ import annotations

import os
import pickle
import pickletools
import re

import numpy as np
import pandas as pd
import pytest

from psamf.data import first_impressions as P
from psamf.errors import InputError

CLIP_RE = re.compile(r"^[A-Za-z0-9_-]{11}\.\d{3}\.mp4$")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fi") / "first-impressions-v2"
    P.write_synthetic_personality_corpus(d, n_clips=300, seed=3)
    return d


@pytest.fixture(scope="module")
def synth_df(synth_dir):
    return P.load_personality_corpus(synth_dir)


def _globals(blob: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(blob) if op.name in ("GLOBAL", "STACK_GLOBAL")}


# --------------------------------------------------------------------------- restricted unpickler

def test_restricted_load_reads_numpy_scalars(synth_dir):
    path = synth_dir / "annotation_training.pkl"
    blob = path.read_bytes()
    assert blob[:2] == b"\x80\x02"  # protocol 2
    assert _globals(blob) == {"numpy.core.multiarray scalar", "numpy dtype"}
    ann = P.restricted_load(path)
    assert list(ann) == ["extraversion", "neuroticism", "agreeableness", "conscientiousness",
                         "interview", "openness"]
    iv = next(iter(ann["interview"].values()))
    assert type(iv) is np.float64 and 0.0 <= iv <= 1.0
    assert all(type(v) is float for v in ann["extraversion"].values())
    assert all(isinstance(k, str) and CLIP_RE.match(k) for k in ann["openness"])
    texts = P.restricted_load(synth_dir / "transcription_training.pkl")
    assert _globals((synth_dir / "transcription_training.pkl").read_bytes()) == set()
    assert set(texts) == set(ann["interview"]) and all(isinstance(t, str) for t in texts.values())


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def test_rejects_os_system(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "annotation_training.pkl"
    bad.write_bytes(pickle.dumps({"extraversion": _Evil(os.system, f"touch {marker}")}, protocol=2))
    assert b"system" in bad.read_bytes()
    with pytest.raises(InputError) as e:
        P.restricted_load(bad)
    assert "forbidden global" in str(e.value) and "system" in str(e.value)
    assert e.value.where == str(bad)
    assert not marker.exists()


def test_rejects_builtins_eval(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "x.pkl"
    bad.write_bytes(pickle.dumps(_Evil(eval, f"open({str(marker)!r}, 'w').close()"), protocol=2))
    with pytest.raises(InputError, match=r"forbidden global .*eval"):
        P.restricted_load(bad)
    assert not marker.exists()


def test_rejects_numpy2_style_pickle(tmp_path):
    # What Python 3 + numpy 2 write at protocol 2: other globals (numpy._core..., _codecs.encode).
    p = tmp_path / "n2.pkl"
    p.write_bytes(pickle.dumps({"a": np.float64(0.5)}, protocol=2))
    with pytest.raises(InputError, match="forbidden global"):
        P.restricted_load(p)


def test_rejects_object_dtype_scalar(tmp_path):
    # Allowed globals only, but scalar(dtype('O'), ...) would hand back an arbitrary object.
    p = tmp_path / "obj.pkl"
    p.write_bytes(b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nU\x02O8K\x00K\x01\x87R"
                  b"U\x01x\x86R.")
    with pytest.raises(InputError, match="non-numeric dtype"):
        P.restricted_load(p)


@pytest.mark.parametrize("mangle", ["truncated", "garbage", "empty"])
def test_bad_pickle_bytes_are_one_line_errors(synth_dir, tmp_path, mangle):
    blob = (synth_dir / "annotation_validation.pkl").read_bytes()
    bad = tmp_path / "annotation_validation.pkl"
    bad.write_bytes({"truncated": blob[: len(blob) // 2], "garbage": b"\x80\x02\xff\xfe not a pickle",
                     "empty": b""}[mangle])
    with pytest.raises(InputError) as e:
        P.restricted_load(bad)
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "\n" not in msg
    if mangle == "truncated":
        assert "truncated" in msg


@pytest.mark.parametrize("obj, what", [
    ([1, 2, 3], "top level must be a dict"),
    ({t: {} for t in P.TRAITS}, "missing interview"),
    ({**{t: {"abcdefghijk.000.mp4": 0.5} for t in P.LABELS}, "extraversion": {"abcdefghijk.000.mp4": 1.5}},
     "outside"),
    ({**{t: {"abcdefghijk.000.mp4": 0.5} for t in P.LABELS}, "openness": {"noext": 0.5}}, "clip name"),
    ({**{t: {"abcdefghijk.000.mp4": 0.5} for t in P.LABELS}, "openness": {"abcdefghijk.001.mp4": 0.5}},
     "clip set differs"),
])
def test_wrong_annotation_structure(tmp_path, obj, what):
    p = tmp_path / "annotation_test.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(InputError, match=what) as e:
        P.load_annotations(p)
    assert e.value.where == str(p)


def test_wrong_transcription_structure(tmp_path):
    p = tmp_path / "transcription_test.pkl"
    p.write_bytes(pickle.dumps({"abcdefghijk.000.mp4": 3}, protocol=2))
    with pytest.raises(InputError, match="transcript must be a string"):
        P.load_transcriptions(p)


# --------------------------------------------------------------------------- loading

def test_missing_file_is_named(synth_dir, tmp_path):
    d = tmp_path / "fi"
    d.mkdir()
    for f in synth_dir.iterdir():
        if f.name != "transcription_validation.pkl":
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError) as e:
        P.load_personality_corpus(d)
    assert e.value.where == str(d / "transcription_validation.pkl")
    with pytest.raises(InputError, match="directory not found"):
        P.load_personality_corpus(tmp_path / "nope")


def test_load_synthetic_frame(synth_df):
    df = synth_df
    assert list(df.columns) == P.COLUMNS
    assert len(df) == 300 and df["clip_id"].is_unique
    assert df["official_split"].value_counts().to_dict() == {"train": 180, "valid": 60, "test": 60}
    assert (df["youtube_id"] == df["clip_id"].str.split(".").str[0]).all()
    for t in P.LABELS:
        assert df[t].dtype == np.float64 and df[t].between(0, 1).all()
    # Several clips per speaker, and (like the real corpus) speakers shared across official splits.
    assert df.groupby("youtube_id").size().max() > 1
    info = P.corpus_info(df)
    assert info["official_split"]["shared_youtube_ids"]["train&test"] > 0
    # Empty transcripts are kept and flagged, not dropped.
    assert info["empty_texts"] == int(df["empty_text"].sum()) >= 1
    assert (df.loc[df["empty_text"], "text"] == "").all()


def test_traits_constant_and_stability_alias(synth_df):
    assert P.TRAITS == ("extraversion", "neuroticism", "agreeableness", "conscientiousness", "openness")
    assert P.NEUROTICISM_MEANS_STABILITY is True
    assert "stability" in P.__doc__.lower() and "STABILITY" in P.TRAIT_MEANING["neuroticism"]
    s = P.stability(synth_df)
    assert s.name == "stability"
    np.testing.assert_array_equal(s.to_numpy(), synth_df["neuroticism"].to_numpy())  # not inverted


# --------------------------------------------------------------------------- speaker-disjoint split

def _assert_disjoint(df):
    per = df.groupby("youtube_id")["split"].nunique()
    assert (per == 1).all(), per[per > 1].index[:5].tolist()


def test_speaker_disjoint_split(synth_df):
    a = P.speaker_disjoint_split(synth_df, seed=0)
    _assert_disjoint(a)
    assert set(a["split"]) == set(P.SPLITS)
    frac = a["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.05 and abs(frac["valid"] - 0.15) < 0.05
    # Deterministic per seed, independent of row order; another seed gives another split.
    b = P.speaker_disjoint_split(synth_df.sample(frac=1.0, random_state=1), seed=0).sort_index()
    pd.testing.assert_series_equal(a["split"], b["split"])
    c = P.speaker_disjoint_split(synth_df, seed=1)
    _assert_disjoint(c)
    assert not a["split"].equals(c["split"])
    assert "split" not in synth_df  # a copy, not in place


def test_speaker_split_edge_cases(synth_df):
    tiny = synth_df[synth_df["youtube_id"].isin(sorted(synth_df["youtube_id"].unique())[:3])]
    s = P.speaker_disjoint_split(tiny, seed=0)
    assert set(s["split"]) == set(P.SPLITS)
    _assert_disjoint(s)
    only = P.speaker_disjoint_split(synth_df, fractions=(1.0, 0.0, 0.0), seed=0)
    assert set(only["split"]) == {"train"}
    for bad in [(0.5, 0.5, 0.5), (0.7, 0.3), (1.2, -0.1, -0.1)]:
        with pytest.raises(InputError, match="fractions"):
            P.speaker_disjoint_split(synth_df, fractions=bad, seed=0)


# --------------------------------------------------------------------------- synthetic corpus

def test_synthetic_is_byte_deterministic(tmp_path):
    a = P.write_synthetic_personality_corpus(tmp_path / "a", n_clips=120, seed=7)
    b = P.write_synthetic_personality_corpus(tmp_path / "b", n_clips=120, seed=7)
    names = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert names == sorted([p.name for p in P.corpus_files(tmp_path)] + [P.SYNTHETIC_MARKER])
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert a["files"] == b["files"]
    c = P.write_synthetic_personality_corpus(tmp_path / "c", n_clips=120, seed=8)
    assert c["files"]["annotation_training.pkl"] != a["files"]["annotation_training.pkl"]
    # Rewriting in place replaces the old corpus atomically and gives the same bytes.
    again = P.write_synthetic_personality_corpus(tmp_path / "a", n_clips=120, seed=7)
    assert again["files"] == a["files"]


def test_synthetic_refuses_foreign_dir_and_bad_size(tmp_path):
    (tmp_path / "keep.csd").write_text("x")
    with pytest.raises(InputError, match="refusing"):
        P.write_synthetic_personality_corpus(tmp_path, n_clips=50, seed=0)
    assert (tmp_path / "keep.csd").exists()
    with pytest.raises(InputError, match="n_clips"):
        P.write_synthetic_personality_corpus(tmp_path / "x", n_clips=2, seed=0)


def test_synthetic_clip_names(synth_df):
    assert synth_df["clip_id"].str.match(CLIP_RE).all()


def test_synthetic_text_is_learnable(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    P.write_synthetic_personality_corpus(tmp_path / "fi", n_clips=600, seed=0)
    df = P.speaker_disjoint_split(P.load_personality_corpus(tmp_path / "fi"), seed=0)
    tr, te = df[df["split"] == "train"], df[df["split"] == "test"]
    vec = TfidfVectorizer()
    x_tr, x_te = vec.fit_transform(tr["text"]), vec.transform(te["text"])
    for trait in P.LABELS:
        pred = Ridge(alpha=1.0).fit(x_tr, tr[trait]).predict(x_te)
        r = np.corrcoef(pred, te[trait])[0, 1]
        assert r > 0.3, (trait, r)


# --------------------------------------------------------------------------- the real corpus

@pytest.mark.shared_data
def test_real_first_impressions(shared_data):
    d = P.find_real_corpus(shared_data)
    if d is None:
        pytest.skip(f"{shared_data / P.FI_DIRNAME} lacks the six First Impressions v2 pickles")
    df = P.load_personality_corpus(d)
    assert df["official_split"].value_counts().to_dict() == {"train": 6000, "valid": 2000, "test": 2000}
    for t in P.LABELS:
        assert df[t].between(0, 1).all()
    info = P.corpus_info(df)
    assert info["empty_texts"] == 11
    assert info["official_split"]["shared_youtube_ids"]["train&test"] == 1201
    # neuroticism is stability: it correlates positively with extraversion.
    assert df["neuroticism"].corr(df["extraversion"]) > 0.7
    s = P.speaker_disjoint_split(df, seed=0)
    _assert_disjoint(s)
    frac = s["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.01 and abs(frac["test"] - 0.15) < 0.01
