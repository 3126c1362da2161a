"""psamf.validation: a small valid prepared dataset passes; each kind of bad input fails,
and the failure line names the expectation, the table.column and the offending segment."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from psamf.data.prepared import PreparedDataset, save_prepared
from psamf.errors import InputError
from psamf.config import load_config
from psamf.validation import validate, validate_dataset

REPO = Path(__file__).resolve().parents[1]

# speaker -> segments per video; smoke profile: loo_users=2, min_user_segments=10
SPEAKERS = {"spkA": [7, 6], "spkB": [11], "spkC": [4, 3], "spkD": [5]}
FOLD = {"spkA": "train", "spkB": "train", "spkC": "valid", "spkD": "test"}


def make_dataset(cfg, seed: int = 0) -> PreparedDataset:
    rng = np.random.default_rng(seed)
    rows, folds, video_end = [], {"train": [], "valid": [], "test": []}, {}
    for s, per_video in SPEAKERS.items():
        for j, n in enumerate(per_video):
            vid = f"{s}-vid_{j}x"  # ids may hold '_' and '-', as YouTube ids do
            folds[FOLD[s]].append(vid)
            video_end[vid] = 2.0 * n + 1.0
            for k in range(n):
                rows.append({"segment_id": f"{vid}_{k + 1}", "video_id": vid, "speaker_id": s,
                             "split": FOLD[s], "label": float(rng.uniform(-3, 3)), "text": f"words {k}",
                             "start": 2.0 * k, "end": 2.0 * k + 1.5})
    seg = pd.DataFrame(rows)
    n, t = len(seg), cfg.data.seq_len
    arrays = {}
    for m, dim in (("audio", cfg.data.audio_dim), ("visual", cfg.data.visual_dim)):
        lens = rng.integers(1, 2 * t, size=n)
        mask = np.arange(t)[None, :] < np.minimum(lens, t)[:, None]
        arrays[m] = (rng.standard_normal((n, t, dim)) * mask[..., None]).astype(np.float32)
        arrays[f"{m}_len"] = lens.astype(np.int64)
        arrays[f"{m}_mask"] = mask
    manifest = {"corpus": cfg.data.corpus, "av_simulated": True, "folds": folds, "video_end": video_end,
                "nonfinite": {"policy": "zero", "audio": 7, "visual": 0}}
    return PreparedDataset(seg, arrays, manifest)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation")
    return load_config(REPO / "params.yaml", "smoke", [f"data.prepared_dir={tmp}/prepared"])


@pytest.fixture(scope="module")
def good(cfg):
    return make_dataset(cfg)


@pytest.fixture(scope="module")
def good_result(good, cfg, tmp_path_factory):
    """The CLI's path: save the dataset, then validate(cfg) from the prepared dir into the
    default out dir (reports/validation/<corpus>, relative to the working directory)."""
    save_prepared(good, cfg.data.prepared_path)
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = validate(cfg)
    assert result.summary_path == Path("reports/validation/synthetic/summary.json")
    result.summary_path = work / result.summary_path
    result.data_docs_index = work / result.data_docs_index
    return result


def test_valid_dataset_passes(good_result):
    assert good_result.failures == []
    assert good_result.success is True
    s = json.loads(good_result.summary_path.read_text())
    assert s["success"] is True and s["failures"] == []
    assert s["corpus"] == "synthetic" and s["av_simulated"] is True
    assert s["counts"]["segments"] == sum(map(sum, SPEAKERS.values()))
    assert s["counts"]["splits"] == {"train": 24, "valid": 7, "test": 5}
    assert s["nonfinite"] == {"policy": "zero", "replaced_at_ingest": {"audio": 7, "visual": 0},
                              "remaining": {"audio": 0, "visual": 0}}
    assert s["loo_users"] == [{"speaker_id": "spkA", "n_segments": 13}, {"speaker_id": "spkB", "n_segments": 11}]
    assert set(s["tables"]) == {"segments", "arrays", "loo_users"}
    assert all(t["success"] and t["evaluated"] > 0 for t in s["tables"].values())
    assert len(s["expectations"]) > 40 and all(e["success"] for e in s["expectations"])


def test_data_docs_and_summary_written(good_result):
    out = good_result.summary_path.parent
    assert good_result.summary_path == out / "summary.json"
    index = out / "data_docs" / "index.html"
    assert good_result.data_docs_index == index and index.is_file()
    s = json.loads(good_result.summary_path.read_text())
    assert s["data_docs"] == "reports/validation/synthetic/data_docs/index.html"
    pages = list((out / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 3  # one per table
    html = index.read_text()
    for table in ("psamf_segments", "psamf_arrays", "psamf_loo_users"):
        assert table in html
    assert "corpus=synthetic-av_simulated=true" in html  # every report says if AV is simulated
    assert ".tmp" not in html  # built in a temp dir, swapped in: no temp paths leak
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- bad inputs: (mutation, strings that one failure line must contain) ------------------------

def _set(col, row, value):
    def f(ds):
        ds.segments.loc[row, col] = value
    return f


def _array(name, fn):
    def f(ds):
        ds.arrays[name] = fn(ds.arrays[name].copy())
    return f


def _poke(row, value):
    def f(a):
        a[row, 0, 0] = value
        return a
    return f


def _zero_len(ds):
    ds.arrays["audio_len"][3] = 0
    ds.arrays["audio_mask"][3] = False
    ds.arrays["audio"][3] = 0


def _other_fold(ds):
    ds.segments.loc[0, "split"] = "test"


def _too_few(ds):  # spkB keeps 8 segments: still the 2nd LOO user, but below min_user_segments=10
    keep = ~((ds.segments["speaker_id"] == "spkB") & (ds.segments.index > 20))
    sub = ds.subset(keep.to_numpy())
    ds.segments, ds.arrays = sub.segments, sub.arrays


# Row i of the valid dataset: 0-6 spkA-vid_0x_1..7 (video_end 15), 7-12 spkA-vid_1x_1..6,
# 13-23 spkB-vid_0x_1..11, 24-27/28-30 spkC, 31-35 spkD-vid_0x_1..5.
# (mutation, strings that one failure line must contain); each kind validated on its own.
CASES = {
    "duplicate_id": (_set("segment_id", 1, "spkA-vid_0x_1"),
                     ["expect_column_values_to_be_unique", "segments.segment_id", "spkA-vid_0x_1"]),
    "malformed_id": (_set("segment_id", 2, "spkA-vid_0x_0"),
                     ["expect_column_values_to_match_regex", "segments.segment_id", "spkA-vid_0x_0"]),
    "label_out_of_range": (_set("label", 4, 3.5),
                           ["expect_column_values_to_be_between", "segments.label", "spkA-vid_0x_5", "label=3.5"]),
    "label_nan": (_set("label", 5, np.nan), ["expect_column_values_to_not_be_null", "segments.label", "spkA-vid_0x_6"]),
    "inf_in_audio": (_array("audio", _poke(2, -np.inf)),
                     ["arrays.audio_nonfinite", "spkA-vid_0x_3", "audio_nonfinite=1"]),
    "zero_length": (_zero_len, ["arrays.audio_len", "expect_column_values_to_be_between", "spkA-vid_0x_4"]),
    "end_beyond_video": (_set("end", 6, 99.0), ["segments.end_overrun", "spkA-vid_0x_7", "end=99", "video_end=15"]),
    "missing_modality": (lambda ds: ds.arrays.pop("visual"),
                         ["arrays.visual_present", "expect_column_values_to_be_in_set"]),
    "wrong_dim": (_array("audio", lambda a: a[:, :, :70]), ["arrays.audio_dim", "audio_dim=70"]),
    "split_not_fold": (_other_fold, ["segments.split_matches_fold", "spkA-vid_0x_1", "fold_split='train'"]),
    "too_few_for_loo_user": (_too_few, ["loo_users.n_segments", "speaker 'spkB'", "n_segments=8"]),
    "missing_column": (lambda ds: ds.segments.drop(columns=["text"], inplace=True),
                       ["expect_column_to_exist", "segments.text"]),
}

# More kinds, on distinct rows, validated together in one run (each run costs ~0.4 s of GX).
MORE_CASES = {
    "id_other_video": (_set("segment_id", 8, "spkD-vid_0x_9"),
                       ["segments.id_matches_video", "spkD-vid_0x_9", "video_id='spkA-vid_1x'"]),
    "negative_start": (_set("start", 9, -1.0), ["segments.start", "spkA-vid_1x_3", "start=-1"]),
    "start_after_end": (_set("start", 10, 8.0), ["expect_column_pair_values_a_to_be_greater_than_b",
                                                 "segments.end/start", "spkA-vid_1x_4"]),
    "text_empty": (_set("text", 11, ""), ["expect_column_value_lengths_to_be_between", "segments.text", "spkA-vid_1x_5"]),
    "text_blank": (_set("text", 12, "  "), ["expect_column_values_to_match_regex", "segments.text", "spkA-vid_1x_6"]),
    "bad_split_value": (_set("split", 13, "dev"), ["segments.split:", "spkB-vid_0x_1", "split='dev'"]),
    "nan_in_visual": (_array("visual", _poke(14, np.nan)), ["arrays.visual_nonfinite", "spkB-vid_0x_2"]),
    "wrong_seq_len": (_array("visual", lambda a: a[:, :5]), ["arrays.visual_steps", "visual_steps=5"]),
    "int_speaker_ids": (lambda ds: ds.segments.__setitem__("speaker_id", ds.segments["speaker_id"].str[-1].map(ord)),
                        ["expect_column_values_to_be_in_type_list", "segments.speaker_id"]),
    "video_not_in_manifest": (lambda ds: ds.manifest["video_end"].pop("spkD-vid_0x"),
                              ["segments.video_end", "expect_column_values_to_not_be_null", "spkD-vid_0x_1"]),
    "manifest_missing_folds": (lambda ds: ds.manifest.pop("folds"), ["manifest.json", "'folds'"]),
}


def _copy(ds):
    return PreparedDataset(ds.segments.copy(), {k: v.copy() for k, v in ds.arrays.items()},
                           copy.deepcopy(ds.manifest))


def _hit(failures, must_contain):
    hits = [f for f in failures if all(s in f for s in must_contain)]
    assert hits, f"no failure line contains {must_contain}:\n" + "\n".join(failures)


DOCS_CASE = "missing_column"


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_fails_naming_it(kind, good, cfg, tmp_path):
    mutate, must_contain = CASES[kind]
    ds = _copy(good)
    mutate(ds)
    docs = kind == DOCS_CASE  # HTML costs ~0.6 s a run: render it for one bad input only
    result = validate_dataset(ds, cfg, tmp_path / "report", data_docs=docs)
    assert result.success is False
    assert result.failures
    _hit(result.failures, must_contain)
    assert all("\n" not in f for f in result.failures)
    summary = json.loads(result.summary_path.read_text())
    assert summary["success"] is False and summary["failures"] == result.failures
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file() == docs


@pytest.fixture(scope="module")
def more_result(good, cfg, tmp_path_factory):
    ds = _copy(good)
    for mutate, _ in MORE_CASES.values():
        mutate(ds)
    return validate_dataset(ds, cfg, tmp_path_factory.mktemp("more"), data_docs=False)


@pytest.mark.parametrize("kind", list(MORE_CASES))
def test_more_bad_inputs_fail_naming_them(kind, more_result):
    assert more_result.success is False
    _hit(more_result.failures, MORE_CASES[kind][1])


def test_missing_prepared_dir_is_input_error(tmp_path):
    empty = load_config(REPO / "params.yaml", "smoke", [f"data.prepared_dir={tmp_path}/nothing"])
    with pytest.raises(InputError, match="segments.parquet"):
        validate(empty, tmp_path / "out")
