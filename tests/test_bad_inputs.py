"""Every file psamf reads refuses bad input with one line naming the file and where, exit 2, and
nothing half-written: bytes that are not UTF-8, keys given twice, rows for segments that do not
exist, CSDs that declare more than they may hold or a non-numeric dtype, ids that would escape a
directory."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from psamf.config import load_config
from psamf.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from psamf.data.synth import write_synthetic_corpus

    root = tmp_path_factory.mktemp("badin")
    write_synthetic_corpus(load_config(REPO / "params.yaml", "smoke", [f"data.raw_dir={root}/raw", "synth.n_speakers=4"]))
    return root / "raw" / "synthetic"


@pytest.fixture
def corpus(pristine, tmp_path):
    raw = tmp_path / "raw" / "synthetic"
    shutil.copytree(pristine, raw)
    return raw


def _ingest_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "psamf.cli.main", "data", "ingest", "--params", str(REPO / "params.yaml"),
            "--profile", "smoke", "--set", f"data.raw_dir={tmp_path / 'raw'}",
            "--set", f"data.prepared_dir={tmp_path / 'prepared'}", "--set", "data.loo_users=1"]
    for e in extra:
        args += ["--set", e]
    return subprocess.run(args, capture_output=True, text=True, env={"PSAMF_TRACKING": "off", "PATH": "/usr/bin:/bin"},
                          timeout=300)


def _one_line_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("psamf: error:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(REPO / "params.yaml", "smoke", [f"data.raw_dir={tmp_path / 'raw'}",
                                                       f"data.prepared_dir={tmp_path / 'prepared'}", *extra])


# ---------------------------------------------------------------------------- text files

def test_transcripts_that_are_not_utf8_name_the_byte_and_line(corpus, tmp_path):
    path = corpus / "transcripts.csv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",", b",\xff\xfe", 1)
    path.write_bytes(b"\n".join(lines))
    offset = len(b"\n".join(lines[:3])) + 1 + lines[3].index(b"\xff")
    line = _one_line_error(_ingest_cli(tmp_path), "transcripts.csv", "not valid UTF-8", f"offset {offset}", "(line 4)")
    assert "0xff" in line
    assert not (tmp_path / "prepared").exists()  # nothing half-written


@pytest.mark.parametrize("name", ["standard_folds.json", "params.yaml", "best_params.json"])
def test_other_text_files_that_are_not_utf8(name, corpus, tmp_path):
    from psamf.data.layout import read_folds
    from psamf.config import load_best_params

    path = tmp_path / name if name != "standard_folds.json" else corpus / name
    good = {"standard_folds.json": path.read_bytes() if path.exists() else b"",
            "params.yaml": b"profile: smoke\n", "best_params.json": b'{"psamf.tau": 0.1}'}[name]
    path.write_bytes(good[:5] + b"\xc3\x28" + good[5:])  # an invalid 2-byte sequence
    read = {"standard_folds.json": read_folds, "params.yaml": load_config, "best_params.json": load_best_params}[name]
    line = good[:5].count(b"\n") + 1
    with pytest.raises(InputError, match=rf"{name}: not valid UTF-8: byte 0xc3 at offset 5 \(line {line}\)"):
        read(path)


def test_a_utf8_bom_is_fine(corpus, tmp_path):
    from psamf.data.layout import read_transcripts

    path = corpus / "transcripts.csv"
    plain = read_transcripts(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_transcripts(path) == plain


# ---------------------------------------------------------------------------- duplicates

@pytest.mark.parametrize("conflict", [False, True])
def test_a_segment_twice_in_transcripts_is_refused_by_name(conflict, corpus, tmp_path):
    path = corpus / "transcripts.csv"
    lines = path.read_text().splitlines()
    dup = lines[2] if not conflict else lines[2].split(",", 1)[0] + ",some other words,0,train"
    lines.insert(6, dup)
    path.write_text("\n".join(lines) + "\n")
    seg = lines[2].split(",", 1)[0]
    _one_line_error(_ingest_cli(tmp_path), "transcripts.csv", f"segment {seg} appears twice (lines 3 and 7)")


def test_duplicates_in_folds_are_refused(corpus):
    from psamf.data.layout import read_folds

    path = corpus / "standard_folds.json"
    folds = json.loads(path.read_text())
    vid = folds["train"][0]
    path.write_text(json.dumps({**folds, "train": folds["train"] + [vid]}))
    with pytest.raises(InputError, match=f"video {vid} is twice in 'train'"):
        read_folds(path)
    text = json.dumps(folds)
    path.write_text(text[:-1] + ', "train": []}')  # the same key twice: JSON would keep the last silently
    with pytest.raises(InputError, match="key 'train' appears twice"):
        read_folds(path)


# ---------------------------------------------------------------------------- rows for segments that do not exist

def test_transcript_rows_without_a_label_are_reported_or_refused(corpus, tmp_path):
    from psamf.data.ingest import ingest
    from psamf.validation import validate

    path = corpus / "transcripts.csv"
    vid = path.read_text().splitlines()[1].split(",", 1)[0].rsplit("_", 1)[0]
    path.write_text(path.read_text() + f"{vid}_999,a segment nobody labelled,0,train\n")
    report = ingest(_cfg(tmp_path, "data.loo_users=1", "data.min_user_segments=1"))
    assert report["orphan_transcripts"] == [f"{vid}_999"]
    manifest = json.loads((tmp_path / "prepared" / "synthetic" / "manifest.json").read_text())
    assert manifest["orphan_transcripts"] == [f"{vid}_999"]
    result = validate(_cfg(tmp_path, "data.loo_users=1", "data.min_user_segments=1"), tmp_path / "val")
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["orphan_transcripts"] == {"count": 1, "segment_ids": [f"{vid}_999"]}
    shutil.rmtree(tmp_path / "prepared")
    _one_line_error(_ingest_cli(tmp_path, "data.orphan_transcripts=error"), "transcripts.csv",
                    "1 row(s) for segments with no label", f"{vid}_999")
    assert not (tmp_path / "prepared").exists()


# ---------------------------------------------------------------------------- CSD shapes, dtypes, ids

def _csd_with(path: Path, vid: str, features: dict, n: int = 1) -> None:
    with h5py.File(path, "w") as f:
        g = f.create_group("root")
        g.create_group("metadata")
        d = g.create_group("data").create_group(vid)
        d.create_dataset("features", **features)
        d.create_dataset("intervals", data=np.zeros((n, 2), np.float32))


def test_a_small_csd_declaring_a_huge_dataset_is_refused_before_reading(tmp_path):
    from psamf.data.csd import read_csd

    path = tmp_path / "huge.csd"
    # 10^9 x 74 float32 = 296 GB declared; nothing written, so the file is a few KB.
    _csd_with(path, "vid1", {"shape": (10**9, 74), "dtype": "f4", "chunks": (1024, 74), "compression": "gzip"})
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match=r"huge.csd: data/vid1/features declares shape \(1000000000, 74\): over the cap"):
        read_csd(path)
    small = tmp_path / "small.csd"
    _csd_with(small, "vid1", {"data": np.zeros((2048, 74), np.float32)}, n=2048)
    assert read_csd(small).dim == 74
    with pytest.raises(InputError, match="over the cap"):
        read_csd(small, max_bytes=100_000)  # the cap is configurable (data.max_csd_mb)


def test_ingest_applies_the_configured_cap(corpus, tmp_path):
    _one_line_error(_ingest_cli(tmp_path, "data.max_csd_mb=1"), "COVAREP", "over the cap")
    assert not (tmp_path / "prepared").exists()


def test_a_non_numeric_dataset_is_refused(tmp_path):
    from psamf.data.csd import read_csd

    path = tmp_path / "strings.csd"
    _csd_with(path, "vid1", {"data": np.array([[b"a", b"b"]], dtype="S1")})
    with pytest.raises(InputError, match=r"data/vid1/features has dtype \|S1, not a number"):
        read_csd(path)


@pytest.mark.parametrize("bad", ["..", ".hidden", "a" * 129, "with space", "semi;colon"])
def test_unsafe_ids_are_refused_before_they_name_a_file(bad, tmp_path, corpus):
    from psamf.data.csd import read_csd
    from psamf.data.layout import check_id, read_folds, read_transcripts

    with pytest.raises(InputError, match="is not a safe id"):
        check_id(bad, "video id", "here")
    path = tmp_path / "ids.csd"
    _csd_with(path, bad, {"data": np.zeros((1, 3), np.float32)})
    with pytest.raises(InputError, match=r"ids.csd: data/.*: video id .* is not a safe id"):
        read_csd(path)
    folds = corpus / "standard_folds.json"
    f = json.loads(folds.read_text())
    folds.write_text(json.dumps({**f, "test": f["test"] + [f"../{bad}"]}))
    with pytest.raises(InputError, match="fold 'test': video id .* is not a safe id"):
        read_folds(folds)
    tr = corpus / "transcripts.csv"
    tr.write_text(tr.read_text() + f"../{bad}_1,text,0,train\n")
    with pytest.raises(InputError, match=r"transcripts.csv: line \d+: segment id .* is not a safe id"):
        read_transcripts(tr)
    assert check_id("_dI--eQ6qVU", "video id", "x") == "_dI--eQ6qVU"  # real MOSI ids start with _ or -
