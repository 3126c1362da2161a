"""CMU-MOSEI through the same data layer, on a small fixture built here from the SDK's documented
layout (the real MOSEI is not available offline): labels CSD with 7 columns, COVAREP (74-d) and
FACET 4.2 (35-d) CSDs, TimestampedWords as the text, standard_folds.json as the folds."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psamf.config import load_config
from psamf.data.csd import ComputationalSequence, read_csd, write_csd
from psamf.data.ingest import ingest
from psamf.data.layout import LABEL_COLUMNS
from psamf.data.prepared import EMOTION_COLUMNS, load_prepared
from psamf.errors import InputError

REPO = Path(__file__).resolve().parents[1]
# video -> segment count; ids shaped like MOSEI's (YouTube ids, some starting with '-', some numeric).
VIDEOS = {"-aZ3kQ9xLmE": 7, "254298": 6, "b_Yt7Qw2e0s": 5, "Zz9-kk3JqQo": 4, "c4tP0lV8mNw": 3}
FOLDS = {"train": ["-aZ3kQ9xLmE", "254298", "Zz9-kk3JqQo"], "valid": ["c4tP0lV8mNw"], "test": ["b_Yt7Qw2e0s"]}


def _segment(i: int) -> tuple[float, float]:
    return 2.5 * i + 0.5, 2.5 * i + 2.0  # 0.5 s of silence between segments


def _words(vid: str, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """One word straddling each segment's start (its midpoint inside), two more inside, "sp" in the gaps."""
    words, ivals, texts = [], [], {}
    for i in range(n):
        s, e = _segment(i)
        seg = [f"w{i}a", f"w{i}b", f"w{i}c"]
        words += ["sp", seg[0], seg[1], "sp", seg[2]]
        ivals += [[s - 0.5, s - 0.1], [s - 0.1, s + 0.3], [s + 0.3, s + 0.7], [s + 0.7, s + 0.9], [s + 0.9, e - 0.1]]
        texts[f"{vid}_{i + 1}"] = " ".join(seg)
    return np.array(words, dtype=object)[:, None], np.array(ivals, np.float32), texts


def _frames(rng: np.random.Generator, duration: float, hz: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(0, duration, 1 / hz)
    return rng.normal(size=(len(t), dim)).astype(np.float32), np.stack([t, t + 1 / hz], 1).astype(np.float32)


def write_mosei_fixture(root: Path, labels_name: str = "CMU_MOSEI_Labels.csd") -> dict:
    """The SDK layout in `root`; returns the expected labels and texts per segment."""
    rng = np.random.default_rng(0)
    labels, audio, visual, words, expect = {}, {}, {}, {}, {"labels": {}, "texts": {}}
    for vid, n in VIDEOS.items():
        sentiment = rng.integers(-9, 10, n) / 3                   # [-3, 3] in thirds, as MOSEI's means
        emotions = rng.integers(0, 10, (n, 6)) / 3                # [0, 3]
        labels[vid] = (np.column_stack([sentiment, emotions]), np.array([_segment(i) for i in range(n)]))
        duration = _segment(n - 1)[1] + 0.5
        audio[vid] = _frames(rng, duration, 20, 74)
        audio[vid][0][20, 73] = -np.inf                           # COVAREP's -inf quirk, at 1.0 s (segment 1)
        visual[vid] = _frames(rng, duration, 10, 35)
        w, wi, texts = _words(vid, n)
        words[vid] = (w, wi)
        expect["texts"].update(texts)
        expect["labels"].update({f"{vid}_{i + 1}": labels[vid][0][i].astype(np.float32) for i in range(n)})
    meta = {"dataset name": "CMU-MOSEI"}
    write_csd(root / labels_name, ComputationalSequence("All Labels", labels, {
        **meta, "dimension names": list(LABEL_COLUMNS["mosei"])}))
    write_csd(root / "CMU_MOSEI_COVAREP.csd", ComputationalSequence("COVAREP", audio, meta))
    write_csd(root / "CMU_MOSEI_VisualFacet42.csd", ComputationalSequence("FACET 4.2", visual, meta))
    write_csd(root / "CMU_MOSEI_TimestampedWords.csd", ComputationalSequence("words", words, meta))
    (root / "standard_folds.json").write_text(json.dumps(FOLDS))
    return expect


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mosei-sdk")
    return root, write_mosei_fixture(root)


@pytest.fixture
def sdk(pristine, tmp_path) -> Path:
    shutil.copytree(pristine[0], tmp_path / "sdk")
    return tmp_path / "sdk"


def _cfg(tmp_path: Path, sdk: Path, *extra: str):
    return load_config(REPO / "params.yaml", "smoke", [
        "data.corpus=mosei", f"data.mosei_dir={sdk}", f"data.raw_dir={tmp_path}/raw",
        f"data.prepared_dir={tmp_path}/prepared", "data.loo_users=2", "data.min_user_segments=5", *extra])


@pytest.fixture(scope="module")
def prepared(pristine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mosei")
    cfg = _cfg(tmp, pristine[0])
    return cfg, ingest(cfg), load_prepared(cfg.data.prepared_path)


# ---------------------------------------------------------------------------- reader

def test_sentiment_is_column_0_and_the_emotions_are_kept(prepared, pristine):
    _, report, ds = prepared
    expect = pristine[1]["labels"]
    assert report["corpus"] == "mosei" and report["av_simulated"] is False
    assert report["n_prepared"] == len(ds) == sum(VIDEOS.values()) and report["excluded"] == []
    assert EMOTION_COLUMNS == ["emo_happy", "emo_sad", "emo_anger", "emo_surprise", "emo_disgust", "emo_fear"]
    for row in ds.segments.itertuples(index=False):
        want = expect[row.segment_id]
        assert row.label == pytest.approx(want[0])
        assert [getattr(row, c) for c in EMOTION_COLUMNS] == pytest.approx(list(want[1:]))
    assert report["nonfinite"]["audio"] == len(VIDEOS)  # one -inf per video, zeroed by policy
    assert ds.arrays["audio"].shape[2] == 74 and ds.arrays["visual"].shape[2] == 35


def test_text_is_built_from_the_timestamped_words(prepared, pristine):
    _, _, ds = prepared
    got = dict(zip(ds.segments["segment_id"], ds.segments["text"]))
    assert got == pristine[1]["texts"]  # "sp" dropped; a word goes where its midpoint is


def test_folds_and_loo_users(prepared):
    _, report, ds = prepared
    split_of = {v: s for s, vs in FOLDS.items() for v in vs}
    assert (ds.segments["split"] == ds.segments["video_id"].map(split_of)).all()
    assert (ds.segments["speaker_id"] == ds.segments["video_id"]).all()
    assert report["labelled_splits"] == {"train": 17, "valid": 3, "test": 5}
    assert ds.loo_users(2) == ["-aZ3kQ9xLmE", "254298"]  # most segments first
    assert report["unfolded_videos"] == [] and report["unlabelled_fold_videos"] == []


def test_validation_passes_and_checks_the_emotions(prepared, tmp_path):
    from psamf.validation import validate
    from psamf.validation.runner import validate_dataset

    cfg, _, ds = prepared
    result = validate(cfg, tmp_path / "val")
    assert result.success, result.failures
    described = {e["description"] for e in result.summary["expectations"]}
    assert "emo_fear within [0, 3] (so finite)" in described
    bad = ds.subset(np.ones(len(ds), bool))
    bad.segments.loc[2, "emo_sad"] = np.inf
    bad.segments.loc[4, "emo_happy"] = np.nan
    failed = validate_dataset(bad, cfg, tmp_path / "bad", data_docs=False)
    assert not failed.success
    lines = "\n".join(failed.failures)
    assert "segments.emo_sad" in lines and ds.segments["segment_id"][2] in lines
    assert "segments.emo_happy" in lines and ds.segments["segment_id"][4] in lines


def test_transcripts_csv_wins_over_the_words(sdk, tmp_path):
    from psamf.data.layout import write_transcripts

    segs = [f"{v}_{i + 1}" for v, n in VIDEOS.items() for i in range(n)]
    write_transcripts(sdk / "transcripts.csv", [(s, f"typed text of {s}", 0.0, "train") for s in segs])
    ingest(_cfg(tmp_path, sdk))
    ds = load_prepared(tmp_path / "prepared" / "mosei")
    assert (ds.segments["text"] == "typed text of " + ds.segments["segment_id"]).all()


def test_the_opinion_labels_name_is_accepted_too(sdk, tmp_path):
    (sdk / "CMU_MOSEI_Labels.csd").rename(sdk / "CMU_MOSEI_Opinion_Labels.csd")
    report = ingest(_cfg(tmp_path, sdk))
    assert report["n_prepared"] == sum(VIDEOS.values())
    assert json.loads((tmp_path / "prepared" / "mosei" / "manifest.json").read_text())[
        "sources"]["labels"]["path"].endswith("CMU_MOSEI_Opinion_Labels.csd")


def test_the_sdk_fold_quirks_are_listed_not_fatal(sdk, tmp_path):
    """The SDK's folds leave labelled videos out and name videos without labels."""
    folds = json.loads((sdk / "standard_folds.json").read_text())
    folds["valid"].remove("c4tP0lV8mNw")
    labels = read_csd(sdk / "CMU_MOSEI_Labels.csd")
    del labels.data["Zz9-kk3JqQo"]                   # still in 'train', still in the AV CSDs
    write_csd(sdk / "CMU_MOSEI_Labels.csd", labels)
    (sdk / "standard_folds.json").write_text(json.dumps(folds))
    report = ingest(_cfg(tmp_path, sdk))
    assert report["unfolded_videos"] == ["c4tP0lV8mNw"]
    assert report["unlabelled_fold_videos"] == ["Zz9-kk3JqQo"]
    assert report["n_prepared"] == 7 + 6 + 5


def test_simulated_av_when_the_download_has_none(sdk, tmp_path):
    from psamf.data.layout import SIMULATED_KEY
    from psamf.data.mosi import simulate_av

    for name in ("CMU_MOSEI_COVAREP.csd", "CMU_MOSEI_VisualFacet42.csd"):
        (sdk / name).unlink()
    cfg = _cfg(tmp_path, sdk, "simulate.audio_hz=10", "simulate.visual_hz=5")
    with pytest.raises(InputError, match=r"CMU_MOSEI_COVAREP.csd: no audio CSD .* `psamf data simulate-av --corpus mosei`"):
        ingest(cfg)
    assert not cfg.data.prepared_path.exists()
    out = simulate_av(cfg)
    assert out["corpus"] == "mosei" and Path(out["out"]) == tmp_path / "raw" / "mosei"
    assert read_csd(tmp_path / "raw" / "mosei" / "CMU_MOSEI_VisualFacet42.csd").metadata[SIMULATED_KEY]
    report = ingest(cfg)
    assert report["av_simulated"] is True and report["n_prepared"] == sum(VIDEOS.values())


# ---------------------------------------------------------------------------- bad input

def _rewrite_labels(sdk: Path, fn) -> None:
    labels = read_csd(sdk / "CMU_MOSEI_Labels.csd")
    write_csd(sdk / "CMU_MOSEI_Labels.csd", fn(labels))


def _six_columns(seq: ComputationalSequence) -> ComputationalSequence:
    f, i = seq.data["254298"]
    seq.data["254298"] = (f[:, :6], i)
    return seq


def _unknown_fold_video(sdk: Path) -> None:
    folds = json.loads((sdk / "standard_folds.json").read_text())
    (sdk / "standard_folds.json").write_text(json.dumps({**folds, "test": folds["test"] + ["noSuchVideo"]}))


def _non_utf8_word(sdk: Path) -> None:
    seq = read_csd(sdk / "CMU_MOSEI_TimestampedWords.csd", text=True)
    w, i = seq.data["b_Yt7Qw2e0s"]
    w = np.array([x.encode() for x in w[:, 0]], dtype=object)[:, None]
    w[2, 0] = b"caf\xe9"
    seq.data["b_Yt7Qw2e0s"] = (w, i)
    write_csd(sdk / "CMU_MOSEI_TimestampedWords.csd", seq)


BAD = {
    "wrong_column_count": (lambda sdk: _rewrite_labels(sdk, _six_columns),
                           ["CMU_MOSEI_Labels.csd", "data/254298/features has 6 column(s); mosei labels have 7"]),
    "no_labels_file": (lambda sdk: (sdk / "CMU_MOSEI_Labels.csd").unlink(),
                       ["no labels CSD: neither CMU_MOSEI_Labels.csd nor CMU_MOSEI_Opinion_Labels.csd"]),
    "no_text": (lambda sdk: (sdk / "CMU_MOSEI_TimestampedWords.csd").unlink(),
                ["no text: neither transcripts.csv nor CMU_MOSEI_TimestampedWords.csd"]),
    "no_folds": (lambda sdk: (sdk / "standard_folds.json").unlink(), ["standard_folds.json"]),
    "unknown_fold_video": (_unknown_fold_video,
                           ["standard_folds.json", "fold 'test': video noSuchVideo is in no input file"]),
    "non_utf8_word": (_non_utf8_word,
                      ["CMU_MOSEI_TimestampedWords.csd", "data/b_Yt7Qw2e0s/features: a word is not UTF-8"]),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_one_named_error_and_writes_nothing(kind, sdk, tmp_path):
    damage, needles = BAD[kind]
    damage(sdk)
    with pytest.raises(InputError) as err:
        ingest(_cfg(tmp_path, sdk))
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not (tmp_path / "prepared").exists()


def test_cli_bad_input_is_one_line_exit_2(sdk, tmp_path):
    _rewrite_labels(sdk, _six_columns)
    r = subprocess.run([sys.executable, "-m", "psamf.cli.main", "data", "ingest", "--params", str(REPO / "params.yaml"),
                        "--profile", "smoke", "--corpus", "mosei", "--set", f"data.mosei_dir={sdk}",
                        "--set", f"data.raw_dir={tmp_path / 'raw'}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={"PSAMF_TRACKING": "off", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CMU_MOSEI_Labels.csd" in lines[0] and "6 column(s)" in lines[0], r.stderr
    assert not (tmp_path / "prepared").exists()


def test_config_knows_mosei_and_its_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PSAMF_MOSEI_DIR", raising=False)
    cfg = load_config(REPO / "params.yaml", "smoke", ["data.corpus=mosei", f"data.shared_dir={tmp_path}"])
    monkeypatch.delenv("PSAMF_SHARED_DATA", raising=False)
    assert cfg.data.sdk_path == tmp_path / "cmu-mosei"
    monkeypatch.setenv("PSAMF_MOSEI_DIR", str(tmp_path / "mine"))
    assert cfg.data.sdk_path == tmp_path / "mine"
    cfg.data.mosei_dir = str(tmp_path / "key")  # the key wins over the env var
    assert cfg.data.sdk_path == tmp_path / "key"
    with pytest.raises(InputError, match="data.corpus must be one of synthetic, mosi, mosei"):
        load_config(REPO / "params.yaml", "smoke", ["data.corpus=mosie"])
