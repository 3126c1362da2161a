"""The champion/challenger gate: properties of the pure rule, then `register` on a sqlite registry."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from psamf.config import RegistryConfig
from psamf.errors import InputError
from psamf.registry.gate import TOL, decide, test_set_id

SET_A = test_set_id("synthetic", ["v1_1", "v1_2", "v2_1"], False)
SET_B = test_set_id("mosi", ["v1_1", "v1_2", "v2_1"], False)

maes = st.floats(min_value=0.0, max_value=4.0, allow_nan=False)
accs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
margins = st.floats(min_value=0.0, max_value=0.5, allow_nan=False)
ids = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True)


def model(mae, acc, tsid=SET_A):
    return {"mae": mae, "non0_acc2": acc, "test_set_id": tsid}


@settings(max_examples=300, deadline=None)
@given(maes, accs, maes, accs, margins, margins)
def test_never_promotes_a_worse_model(c_mae, c_acc, k_mae, k_acc, mae_margin, acc_margin):
    cfg = RegistryConfig(mae_margin=mae_margin, acc2_margin=acc_margin)
    d = decide(model(c_mae, c_acc), model(k_mae, k_acc), cfg)
    if d.promote:
        # strictly lower MAE, by more than the margin; Acc2 not lower by more than its margin
        assert c_mae < k_mae - mae_margin
        assert c_acc >= k_acc - acc_margin - 2 * TOL
        assert d.verdict == "promoted" and d.alias == "champion"
    if c_mae >= k_mae or c_acc < k_acc - acc_margin - 2 * TOL:  # worse on either headline metric
        assert not d.promote and d.alias == "challenger"


@settings(max_examples=200, deadline=None)
@given(maes, accs, st.floats(min_value=1e-6, max_value=2.0), st.floats(min_value=0.0, max_value=1.0))
def test_a_clearly_better_model_is_promoted(c_mae, c_acc, gain, acc_lead):
    k_mae, k_acc = c_mae + gain, max(0.0, c_acc - acc_lead)
    assume(k_mae - c_mae > 1e-7)  # float addition can eat part of a tiny gain
    d = decide(model(c_mae, c_acc), model(k_mae, k_acc), RegistryConfig())
    assert d.promote and d.deltas["mae_gain"] == pytest.approx(k_mae - c_mae)


@settings(max_examples=100, deadline=None)
@given(maes, accs, margins, margins)
def test_first_model_becomes_champion(mae, acc, mae_margin, acc_margin):
    d = decide(model(mae, acc), None, RegistryConfig(mae_margin=mae_margin, acc2_margin=acc_margin))
    assert d.promote and d.verdict == "first" and d.alias == "champion"


@settings(max_examples=100, deadline=None)
@given(maes, accs, margins, margins)
def test_a_tie_keeps_the_champion(mae, acc, mae_margin, acc_margin):
    d = decide(model(mae, acc), model(mae, acc), RegistryConfig(mae_margin=mae_margin, acc2_margin=acc_margin))
    assert not d.promote and d.verdict == "tie"
    # float noise below TOL is still a tie
    d = decide(model(mae - TOL / 10, acc), model(mae, acc), RegistryConfig())
    assert not d.promote


@settings(max_examples=200, deadline=None)
@given(maes, accs, maes, accs, st.sampled_from(["corpus", "segments", "av", "missing"]), ids)
def test_different_test_sets_are_never_compared(c_mae, c_acc, k_mae, k_acc, what, segs):
    champion_set = test_set_id("synthetic", segs, False)
    other = {"corpus": test_set_id("mosi", segs, False),
             "segments": test_set_id("synthetic", segs + ["one-more"], False),
             "av": test_set_id("synthetic", segs, True),
             "missing": None}[what]
    d = decide(model(c_mae, c_acc, other), model(k_mae, k_acc, champion_set), RegistryConfig())
    assert not d.promote and d.verdict == "incomparable" and d.alias == "challenger"
    assert "incomparable" in d.reason and d.deltas == {}


@given(ids, st.booleans())
def test_test_set_id_ignores_order_and_duplicates(segs, av):
    assert test_set_id("mosi", segs, av) == test_set_id("mosi", list(reversed(segs)) + segs[:1], av)
    assert test_set_id("mosi", segs, av) != test_set_id("mosi", segs, not av)


def test_invalid_metrics_and_bad_margins():
    assert decide(model(float("nan"), 0.8), model(0.9, 0.8), RegistryConfig()).verdict == "invalid"
    assert decide(model(0.5, None), None, RegistryConfig()).promote is False
    assert decide(model(0.5, 0.8), model(float("nan"), 0.8), RegistryConfig()).verdict == "incomparable"
    with pytest.raises(InputError, match="registry.mae_margin must be >= 0, got -0.1"):
        RegistryConfig(mae_margin=-0.1)  # refused when the config is built, so decide() never sees it


def test_margins_hold_back_small_gains():
    cfg = RegistryConfig(mae_margin=0.05, acc2_margin=0.01)
    champ = model(0.90, 0.80)
    assert not decide(model(0.86, 0.85), champ, cfg).promote           # gain 0.04 <= 0.05
    assert decide(model(0.84, 0.79), champ, cfg).promote               # gain 0.06, acc2 -0.01 allowed
    d = decide(model(0.70, 0.78), champ, cfg)                          # acc2 -0.02 > margin
    assert not d.promote and d.verdict == "rejected" and "Non0-Acc2" in d.reason


# ---------------------------------------------------------------------------- register() on sqlite

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite registry for this module (creating its schema costs seconds); tests use their own names."""
    import mlflow

    from psamf.config import load_config

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/reg.db"
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("PSAMF_ARTIFACT_ROOT", str(tmp / "art"))
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        exp = client.create_experiment("registry-test")
        yield load_config(None, "smoke"), client, exp
    mlflow.set_tracking_uri(before)


def _aliases(client, name) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def _run(client, exp) -> str:
    return client.create_run(exp).info.run_id


def test_register_moves_aliases_and_never_duplicates(store):
    from psamf.registry.gate import register

    cfg, client, exp = store
    name = "test-model"

    def reg(run_id, mae, acc, tsid=SET_A):
        return register(cfg, run_id, f"runs:/{run_id}/model", {"mae": mae, "non0_acc2": acc, "corr": 0.5},
                        tsid, name)

    def aliases():
        return _aliases(client, name)

    r1, r2, r3, r4 = (_run(client, exp) for _ in range(4))
    a = reg(r1, 0.90, 0.80)
    assert a["verdict"] == "first" and a["promoted"] and aliases() == {"champion": "1"}
    b = reg(r2, 0.95, 0.82)                                   # worse MAE
    assert b["verdict"] == "rejected" and aliases() == {"champion": "1", "challenger": "2"}
    again = reg(r2, 0.10, 0.99)                               # same run: no new version, first decision stands
    assert again["duplicate"] and again["version"] == "2" and again["verdict"] == "rejected"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    c = reg(r3, 0.80, 0.80)                                   # better: promoted, challenger untouched
    assert c["verdict"] == "promoted" and c["previous_champion"] == "1"
    assert aliases() == {"champion": "3", "challenger": "2"}
    d = reg(r4, 0.10, 0.99, SET_B)                            # another corpus: never compared
    assert d["verdict"] == "incomparable" and aliases() == {"champion": "3", "challenger": "4"}

    # numbers and decision as tags on the version and on the run
    v3 = client.get_model_version(name, "3")
    assert float(v3.tags["gate.mae"]) == 0.80 and v3.tags["gate.test_set_id"] == SET_A
    assert v3.tags["gate.verdict"] == "promoted" and v3.tags["gate.compared_to"] == "1"
    assert float(v3.tags["test.corr"]) == 0.5 and float(v3.tags["gate.mae_gain"]) == pytest.approx(0.10)
    run_tags = client.get_run(r3).data.tags
    assert run_tags["registry.version"] == "3" and run_tags["registry.alias"] == "champion"
    assert run_tags["registry.verdict"] == "promoted"
    assert v3.run_id == r3


def test_register_gates_a_version_a_crash_left_ungated(store):
    from psamf.registry.gate import register

    cfg, client, exp = store
    name = "crashy"
    run = _run(client, exp)
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run}/model", run_id=run)   # created, then "crashed"
    r = register(cfg, run, f"runs:/{run}/model", {"mae": 0.5, "non0_acc2": 0.7}, SET_A, name)
    assert r["version"] == "1" and r["verdict"] == "first" and r["duplicate"]  # no new version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert _aliases(client, name) == {"champion": "1"}


def test_compare_and_promote_cli(store):
    from typer.testing import CliRunner

    from psamf.cli.main import app
    from psamf.registry.gate import register

    cfg, client, exp = store
    for mae in (0.9, 0.95):
        run = _run(client, exp)
        register(cfg, run, f"runs:/{run}/model", {"mae": mae, "non0_acc2": 0.8}, SET_A, cfg.registry.mult_model)
    runner = CliRunner()
    out = runner.invoke(app, ["compare", "--json"])
    assert out.exit_code == 0, out.output
    listing = {m["model_name"]: m for m in json.loads(out.stdout)["models"]}
    mult = listing[cfg.registry.mult_model]
    assert mult["champion"] == "1" and mult["challenger"] == "2"
    assert [v["metrics"]["mae"] for v in mult["versions"]] == [0.9, 0.95]
    assert listing[cfg.registry.psamf_model]["registered"] is False
    table = runner.invoke(app, ["compare", "--model", "mult"])
    assert table.exit_code == 0 and "champion v1" in table.output
    assert any(line.startswith("*") and " 1 " in line for line in table.output.splitlines())
    out = runner.invoke(app, ["promote", "--model", "mult", "--version", "2", "--reason", "new test set"])
    assert out.exit_code == 0, out.output
    assert _aliases(client, cfg.registry.mult_model) == {"champion": "2"}
    bad = runner.invoke(app, ["promote", "--model", "mult", "--version", "9", "--reason", "x"])
    assert bad.exit_code == 2 and "no version" in bad.output


@pytest.mark.parametrize("step", ["decision", "before-alias", "after-alias", "verdict"])
def test_a_crash_at_each_step_is_recovered_by_a_rerun(store, step, monkeypatch):
    """Crash while writing the decision, before or after moving the alias, or while marking it done:
    the rerun ends with the right champion, the verdict recorded, and no second version."""
    from psamf.registry.gate import register

    cfg, client, exp = store
    name = f"crash-{step}"

    def reg(run_id, mae):
        return register(cfg, run_id, f"runs:/{run_id}/model", {"mae": mae, "non0_acc2": 0.8}, SET_A, name)

    first = _run(client, exp)
    reg(first, 0.90)
    better = _run(client, exp)
    import mlflow

    real_tag, real_alias = mlflow.MlflowClient.set_model_version_tag, mlflow.MlflowClient.set_registered_model_alias

    class Crash(Exception):
        pass

    def tag(self, n, version, key, value):
        if n == name and ((step == "decision" and key == "gate.decision") or (step == "verdict" and key == "gate.verdict")):
            raise Crash(key)
        return real_tag(self, n, version, key, value)

    def alias(self, n, a, version):
        if n == name and step == "before-alias":
            raise Crash("before the alias")
        real_alias(self, n, a, version)
        if n == name and step == "after-alias":
            raise Crash("after the alias")

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", tag)
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", alias)
    with pytest.raises(Crash):
        reg(better, 0.80)
    monkeypatch.undo()
    v2 = client.get_model_version(name, "2")
    assert "gate.verdict" not in v2.tags  # the crash left it unfinished
    again = reg(better, 0.80)
    assert again["version"] == "2" and again["verdict"] == "promoted" and again["previous_champion"] == "1"
    assert _aliases(client, name) == {"champion": "2"}
    assert client.get_model_version(name, "2").tags["gate.verdict"] == "promoted"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_a_retried_registration_of_the_same_file_creates_no_version(store):
    """A KFP retry of `register` runs in a new MLflow run: the version is keyed on the file."""
    from psamf.registry.gate import register

    cfg, client, exp = store
    name = "retried"
    a = register(cfg, _run(client, exp), "runs:/x/model", {"mae": 0.9, "non0_acc2": 0.8}, SET_A, name, "sha-1")
    b = register(cfg, _run(client, exp), "runs:/y/model", {"mae": 0.9, "non0_acc2": 0.8}, SET_A, name, "sha-1")
    assert b["duplicate"] and b["version"] == a["version"] == "1"
    c = register(cfg, _run(client, exp), "runs:/z/model", {"mae": 0.9, "non0_acc2": 0.8}, SET_A, name, "sha-2")
    assert c["version"] == "2" and len(client.search_model_versions(f"name = '{name}'")) == 2


def test_test_set_id_changes_with_what_the_segments_hold(smoke_cfg):
    from psamf.data.ingest import ingest
    from psamf.data.prepared import load_prepared
    from psamf.data.synth import write_synthetic_corpus
    from psamf.registry.gate import dataset_test_set_id

    write_synthetic_corpus(smoke_cfg)
    ingest(smoke_cfg)
    ds = load_prepared(smoke_cfg.data.prepared_path)
    idx = np.flatnonzero(ds.segments["split"].to_numpy() == "test")
    base = dataset_test_set_id(ds, idx)
    assert base == dataset_test_set_id(ds, idx[::-1])  # order-free
    ds.segments.loc[idx[0], "label"] += 0.5
    assert dataset_test_set_id(ds, idx) != base  # same ids, other labels
    ds.segments.loc[idx[0], "label"] -= 0.5
    assert dataset_test_set_id(ds, idx) == base
    ds.arrays["audio"][idx[0], 0, 0] += 1.0
    assert dataset_test_set_id(ds, idx) != base  # same ids and labels, other features
    ds.arrays["audio"][idx[0], 0, 0] -= 1.0
    ds.manifest["seq_len"] = 99
    assert dataset_test_set_id(ds, idx) != base
