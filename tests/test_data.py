"""Data layer: SDK .csd round-trip, alignment, synth determinism, MOSI ingest, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from psamf.data.align import av_inputs, frames_in, normalize_by_group, pool_or_pad
from psamf.data.csd import ComputationalSequence, read_csd, write_csd
from psamf.data.ingest import ingest
from psamf.data.prepared import load_prepared
from psamf.data.synth import file_digests, write_synthetic_corpus
from psamf.errors import InputError

MOSI_LOO = ["2WGyTLYerpo", "VbQk4H8hgr0", "Ci-AH39fi3Y", "d6hH302o4v8", "7JsX8y1ysxY",
            "I5y0__X72p0", "zhpQhgha_KU", "HEsqda8_d0Q", "ZUXBRvtny7o", "bOL9jKpeJRs"]


# ---- computational sequences -------------------------------------------------------------

def test_writer_output_reads_back_like_the_sdk_file(shared_data, tmp_path):
    real = shared_data / "cmu-mosi" / "CMU_MOSI_Opinion_Labels.csd"
    sdk = read_csd(real)
    assert sdk.root_name == "Opinion Segment Labels"
    assert len(sdk.data) == 93 and sum(len(f) for f, _ in sdk.data.values()) == 2199
    out = write_csd(tmp_path / "copy.csd", sdk)
    ours = read_csd(out)
    assert ours.root_name == sdk.root_name and ours.metadata == sdk.metadata
    for vid, (f, i) in sdk.data.items():
        np.testing.assert_array_equal(ours.data[vid][0], f)
        np.testing.assert_array_equal(ours.data[vid][1], i)
    # Same group/dataset layout, dtypes and metadata encoding as the SDK's own file.
    with h5py.File(real) as a, h5py.File(out) as b:
        ra, rb = a["Opinion Segment Labels"], b["Opinion Segment Labels"]
        assert set(ra["metadata"]) == set(rb["metadata"])
        for k in ra["metadata"]:
            assert ra["metadata"][k][()].tolist() == rb["metadata"][k][()].tolist(), k
        v = "03bSnISJMiM"
        for d in ("features", "intervals"):
            assert ra["data"][v][d].dtype == rb["data"][v][d].dtype
            assert ra["data"][v][d].shape == rb["data"][v][d].shape


def test_writer_is_byte_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    seq = ComputationalSequence("COVAREP", {"vidA": (rng.normal(size=(5, 3)), np.arange(10.0).reshape(5, 2))},
                                {"dataset name": "x"})
    a, b = write_csd(tmp_path / "a.csd", seq), write_csd(tmp_path / "b.csd", seq)
    assert a.read_bytes() == b.read_bytes()


def _good_csd(path):
    return write_csd(path, ComputationalSequence("L", {"v": (np.zeros((2, 1)), np.array([[0, 1], [1, 2.0]]))}))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable HDF5 file"),
    ("garbage", "not a readable HDF5 file"),
    ("two_roots", "exactly one root group"),
    ("no_data_group", "must hold 'data' and 'metadata'"),
    ("no_intervals", "data/v must hold 'features' and 'intervals'"),
    ("row_mismatch", "2 feature rows but 3 intervals"),
    ("missing", "file not found"),
])
def test_unreadable_csd_is_one_named_error(tmp_path, damage, message):
    path = tmp_path / "bad.csd"
    if damage == "truncate":
        _good_csd(path)
        path.write_bytes(path.read_bytes()[:1500])
    elif damage == "garbage":
        path.write_bytes(b"not hdf5 at all" * 100)
    elif damage != "missing":
        with h5py.File(path, "w") as f:
            root = f.create_group("L")
            if damage == "two_roots":
                f.create_group("M")
            if damage != "no_data_group":
                root.create_group("metadata")
                g = root.create_group("data").create_group("v")
                g["features"] = np.zeros((2, 1))
                if damage == "row_mismatch":
                    g["intervals"] = np.zeros((3, 2))
    with pytest.raises(InputError) as e:
        read_csd(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


# ---- alignment ---------------------------------------------------------------------------

def test_pool_keeps_means_and_pad_keeps_lengths():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    pooled, mask = pool_or_pad(x, 5)  # 10 frames -> 5 bins of 2
    np.testing.assert_allclose(pooled[:, 0], [1, 5, 9, 13, 17])
    assert mask.all()
    padded, mask = pool_or_pad(x[:3], 5)
    np.testing.assert_array_equal(padded[:3], x[:3])
    assert (padded[3:] == 0).all() and mask.tolist() == [True] * 3 + [False] * 2
    empty, mask = pool_or_pad(x[:0], 4)
    assert empty.shape == (4, 2) and not mask.any()


def test_pool_uses_every_frame_once():
    x = np.random.default_rng(1).normal(size=(37, 3))
    pooled, _ = pool_or_pad(x, 7)
    edges = np.linspace(0, 37, 8).astype(int)
    np.testing.assert_allclose((pooled * np.diff(edges)[:, None]).sum(0), x.sum(0), rtol=1e-5)


def test_frames_in_interval_and_zero_length():
    ivals = np.stack([np.arange(10) * 0.1, np.arange(1, 11) * 0.1], axis=1)
    assert frames_in(ivals, 0.25, 0.5).tolist() == [2, 3, 4]
    assert frames_in(ivals, 0.33, 0.33).tolist() == [3]  # zero-length: the frame under it
    assert frames_in(ivals, 5.0, 6.0).tolist() == []


def test_speaker_normalization_removes_a_speaker_offset_and_keeps_padding():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 4, 2)).astype(np.float32)        # 3 segments, 4 steps, 2 dims
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    base[~mask] = 0.0
    # the same segments spoken by a second speaker: shifted by 5, scaled by 3 (a voice, a camera)
    x = np.concatenate([base, np.where(mask[..., None], 5.0 + 3.0 * base, 0.0)])
    m = np.concatenate([mask, mask])
    groups = np.array(["a"] * 3 + ["b"] * 3)
    z = normalize_by_group(x, m, groups)
    np.testing.assert_allclose(z[:3], z[3:], atol=1e-5)        # the speaker signature is gone
    for g in "ab":
        frames = z[groups == g][m[groups == g]]
        np.testing.assert_allclose(frames.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(frames.std(0), 1.0, atol=1e-5)
    assert not z[~m].any()                                      # padding stays 0
    # within a speaker, segments keep their differences (what carries the sentiment cue)
    assert np.abs(z[0][mask[0]].mean(0) - z[1][mask[1]].mean(0)).max() > 0.1


def test_speaker_normalization_edge_cases():
    x = np.zeros((2, 3, 2), np.float32)
    x[0, :, 0] = 7.0                                            # a dim constant within its speaker
    x[0, :, 1] = [1.0, 2.0, 3.0]
    m = np.array([[1, 1, 1], [0, 0, 0]], bool)                  # speaker "b" has no real frame
    z = normalize_by_group(x, m, np.array(["a", "b"]))
    assert np.isfinite(z).all() and not z[:, :, 0].any() and not z[1].any()
    np.testing.assert_array_equal(av_inputs(x, m, ["a", "b"], "none"), x)
    with pytest.raises(ValueError, match="shapes do not match"):
        normalize_by_group(x, m[:, :2], ["a", "b"])


# ---- synthetic corpus ----------------------------------------------------------------------

def test_synth_is_byte_identical_per_seed_and_differs_across_seeds(smoke_cfg, tmp_path):
    a = write_synthetic_corpus(smoke_cfg, tmp_path / "a")
    write_synthetic_corpus(smoke_cfg, tmp_path / "b")
    da, db = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert da == db and len(da) >= 6
    assert any(k.startswith("first-impressions-v2/") for k in da), "personality corpus missing"
    smoke_cfg.synth.seed = 1
    write_synthetic_corpus(smoke_cfg, tmp_path / "c")
    dc = file_digests(tmp_path / "c")
    assert dc["PSAMF_SYNTH_Opinion_Labels.csd"] != da["PSAMF_SYNTH_Opinion_Labels.csd"]
    assert a["speakers"] == smoke_cfg.synth.n_speakers


def test_synth_speakers_express_sentiment_differently(smoke_cfg):
    """Personalization has something to find: per-speaker offsets show up in the data."""
    smoke_cfg.synth.n_speakers, smoke_cfg.synth.segments_min, smoke_cfg.synth.segments_max = 12, 40, 40
    write_synthetic_corpus(smoke_cfg)
    ingest(smoke_cfg)
    ds = load_prepared(smoke_cfg.data.prepared_path)
    speakers = json.loads((smoke_cfg.data.raw_path / "speakers.json").read_text())
    X = ds.arrays["visual"].sum(1) / ds.arrays["visual_mask"].sum(1, keepdims=True)
    y = ds.segments["label"].to_numpy()
    # Project frames on the global sentiment direction; each speaker's slope of that
    # projection against y is their facial intensity, which the traits set.
    coef, *_ = np.linalg.lstsq(np.c_[y, np.ones_like(y)], X, rcond=None)
    proj = X @ (coef[0] / np.linalg.norm(coef[0]))
    slopes = {s: np.polyfit(y[g.index], proj[g.index], 1)[0] for s, g in ds.segments.groupby("speaker_id")}
    gains = {s["speaker_id"]: s["visual_intensity"] for s in speakers}
    r = np.corrcoef([slopes[s] for s in sorted(slopes)], [gains[s] for s in sorted(slopes)])[0, 1]
    assert r > 0.7


def test_synth_ingest_counts_and_nonfinite_policy(smoke_cfg):
    info = write_synthetic_corpus(smoke_cfg)
    report = ingest(smoke_cfg)
    assert report["n_prepared"] == info["segments"] == report["n_labelled"]
    ds = load_prepared(smoke_cfg.data.prepared_path)
    T = smoke_cfg.data.seq_len
    assert ds.arrays["audio"].shape == (len(ds), T, smoke_cfg.data.audio_dim)
    assert ds.arrays["visual"].shape == (len(ds), T, smoke_cfg.data.visual_dim)
    assert np.isfinite(ds.arrays["audio"]).all()
    assert report["nonfinite"]["audio"] > 0 and report["nonfinite"]["policy"] == "zero"
    assert (ds.arrays["audio_mask"].sum(1) == np.minimum(ds.arrays["audio_len"], T)).all()
    assert ds.segments["segment_id"].is_unique
    smoke_cfg.data.nonfinite = "error"
    with pytest.raises(InputError, match="non-finite"):
        ingest(smoke_cfg)


def test_the_pipeline_ingest_fills_the_text_feature_cache_inside_its_run(smoke_cfg):
    """The pipeline's ingest task precomputes the text features for every later task: that work
    is the ingest stage's, so its MLflow run spans it (a run that closed before it would show the
    stage as seconds shorter than it was). Plain `ingest` leaves the cache to the first reader."""
    from pathlib import Path

    import mlflow

    from psamf.tracking import tracking_uri

    write_synthetic_corpus(smoke_cfg)
    cache = Path(smoke_cfg.text_features.cache_dir)
    ingest(smoke_cfg)
    assert not list(cache.glob("*.npz"))
    ingest(smoke_cfg, text_features=True)
    (features,) = cache.glob("*.npz")
    client = mlflow.MlflowClient(tracking_uri(smoke_cfg))
    runs = client.search_runs([client.get_experiment_by_name(smoke_cfg.tracking.experiment).experiment_id],
                              "tags.stage = 'ingest'", order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.end_time / 1e3 >= features.stat().st_mtime


# ---- MOSI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mosi_prepared(shared_data, tmp_path_factory):
    from psamf.config import load_config
    from psamf.data.mosi import simulate_av

    tmp = tmp_path_factory.mktemp("mosi")
    cfg = load_config("params.yaml", "smoke", [f"data.shared_dir={shared_data}", "data.corpus=mosi",
                                               f"data.raw_dir={tmp}/raw", f"data.prepared_dir={tmp}/prep",
                                               "simulate.audio_hz=20", "simulate.visual_hz=10"])
    simulate_av(cfg)
    return cfg, ingest(cfg), load_prepared(cfg.data.prepared_path)


def test_mosi_ingest_matches_the_official_counts(mosi_prepared):
    _, report, ds = mosi_prepared
    assert report["n_labelled"] == 2199 and report["videos"] == 93
    assert report["labelled_splits"] == {"train": 1284, "valid": 229, "test": 686}
    assert sorted(e["segment_id"] for e in report["excluded"]) == [
        "2WGyTLYerpo_44", "5W7Z1C_fDaE_24", "BioHAh1qJAQ_30", "lXPQBPVc5Cw_30"]
    assert report["n_prepared"] == len(ds) == 2195
    assert report["av_simulated"] is True and ds.av_simulated


def test_mosi_loo_users_are_the_ten_listed(mosi_prepared):
    _, _, ds = mosi_prepared
    assert ds.loo_users(10) == MOSI_LOO


def test_mosi_simulated_av_is_weak_and_does_not_leak(mosi_prepared):
    from sklearn.linear_model import RidgeCV

    _, _, ds = mosi_prepared
    y = ds.segments["label"].to_numpy()
    tr, te = (ds.segments["split"] == s for s in ("train", "test"))
    for m in ("audio", "visual"):
        X = ds.arrays[m].sum(1) / np.maximum(ds.arrays[f"{m}_mask"].sum(1, keepdims=True), 1)
        pred = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(X[tr], y[tr]).predict(X[te])
        r = np.corrcoef(pred, y[te])[0, 1]
        assert 0.0 < r < 0.45, (m, r)  # some signal, nothing like the label itself
        assert max(abs(np.corrcoef(X[:, j], y)[0, 1]) for j in range(X.shape[1])) < 0.45


# ---- CLI contract for bad input ---------------------------------------------------------------

def test_cli_bad_input_is_one_line_nonzero_and_writes_nothing(smoke_cfg, tmp_path):
    write_synthetic_corpus(smoke_cfg)
    labels = smoke_cfg.data.raw_path / "PSAMF_SYNTH_Opinion_Labels.csd"
    labels.write_bytes(labels.read_bytes()[:2000])
    proc = subprocess.run([sys.executable, "-m", "psamf.cli.main", "data", "ingest", "--profile", "smoke",
                           "--set", f"data.raw_dir={smoke_cfg.data.raw_dir}",
                           "--set", f"data.prepared_dir={smoke_cfg.data.prepared_dir}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "PSAMF_SYNTH_Opinion_Labels.csd" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not smoke_cfg.data.prepared_path.exists()
