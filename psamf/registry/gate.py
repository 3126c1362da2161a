"""The champion/challenger gate for the MLflow model registry (TFX's "blessing"): aliases, not stages.

Every registered version carries the numbers of its evaluation set as tags (`gate.mae`,
`gate.non0_acc2`, `gate.test_set_id`, and every metric as `test.<name>`; the names predate
`registry.eval_split` and stay, so older versions compare). For PSA-MF that set is the
`registry.eval_split` split, valid by default: the gate chooses, so the score it reads is a
selection score, and the test split stays for the one unbiased report. The alias `@champion`
is the version that serves. `@challenger` is the latest version that did not win.

The rule, `decide(challenger, champion, cfg)`, is a pure function:

1. The challenger's MAE or Non0-Acc2 is missing or not finite: not promoted (`invalid`), even
   when there is no champion yet.
2. No champion yet: the challenger becomes champion (verdict `first`).
3. The two were scored on different test sets: not promoted (`incomparable`). "Same test set"
   means an identical `test_set_id` (`test_set_id()`: corpus, a hash of the sorted test
   segment ids, and whether the AV features were simulated). It also counts as different
   when the champion has no recorded test set or numbers (e.g. an alias moved by hand).
   The challenger then gets `@challenger`, and the champion keeps serving. MAEs on
   different data say nothing about which model is better. To switch to a new test set (a
   new corpus, new folds, real AV features), register the models scored on it and move
   `@champion` deliberately (`psamf promote --reason ...`). From then on the gate compares
   within the new set.
4. Same test set. With
       mae_gain    = champion.mae - challenger.mae              (> 0: challenger is better)
       acc2_change = challenger.non0_acc2 - champion.non0_acc2  (< 0: challenger is worse)
   the challenger is promoted (`promoted`) iff
       mae_gain > registry.mae_margin + TOL   and   acc2_change >= -(registry.acc2_margin + TOL)
   i.e. strictly lower MAE by more than the margin, and Non0-Acc2 not lower by more than
   its margin. Otherwise it is `tie` (both differences within TOL of zero) or `rejected`.
   TOL = 1e-9 absorbs float rounding: an MAE gain that only float noise separates from the
   margin is not a gain, so a tie keeps the champion. An Acc2 drop exactly at the margin
   (up to rounding) is allowed. A negative margin would let a worse model through, so
   margins must be >= 0 (config.py refuses others when the config is built).

`register()` applies the rule to a new registry version. It never creates a second version
for the same (run_id, model name): it searches the model's versions by run_id first. A
version left ungated by a crash is gated on the next call. Two concurrent calls that both
created a version keep the lower version number and delete the other. The decision and its
numbers are tags on the version and on the run.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from psamf.config import Config, RegistryConfig

TOL = 1e-9
CHAMPION, CHALLENGER = "champion", "challenger"
GATE = "gate."           # version tags written by the gate
TEST = "test."           # version tags: every test metric
RUN = "registry."        # run tags
HEADLINE = ("mae", "non0_acc2")


@dataclass(frozen=True)
class Decision:
    promote: bool
    verdict: str                                  # first | promoted | tie | rejected | incomparable | invalid
    reason: str
    deltas: dict[str, float] = field(default_factory=dict)  # mae_gain, acc2_change (comparable pairs only)

    @property
    def alias(self) -> str:
        return CHAMPION if self.promote else CHALLENGER


def test_set_id(corpus: str, segment_ids: Iterable[str], av_simulated: bool, content: str = "") -> str:
    """Fingerprint of a test set: order-independent, changes with any segment, the corpus, the AV
    source, or `content` (what the segments hold: `dataset_test_set_id` passes labels, seq_len
    and a hash of the features, so re-ingested data under the same ids is another test set)."""
    ids = sorted({str(s) for s in segment_ids})
    h = hashlib.sha256(("\n".join(ids) + ("\n#" + content if content else "")).encode()).hexdigest()[:16]
    return f"{corpus}:{len(ids)}:{h}:av_simulated={str(bool(av_simulated)).lower()}"


def dataset_test_set_id(ds, idx) -> str:
    """test_set_id of rows `idx` of a prepared dataset: ids, labels, seq_len, text and features."""
    import json

    import numpy as np

    from psamf.training import tensor_digest

    seg = ds.segments.iloc[idx].sort_values("segment_id")
    order = seg.index.to_numpy()
    content = {"labels": np.round(seg["label"].to_numpy(np.float64), 6).tolist(),
               "text": hashlib.sha256("\n".join(seg["text"].astype(str)).encode()).hexdigest(),
               "seq_len": int(ds.manifest.get("seq_len") or 0),
               "features": tensor_digest({k: v[order] for k, v in ds.arrays.items()})}
    return test_set_id(ds.manifest.get("corpus") or "", seg["segment_id"], ds.av_simulated,
                       json.dumps(content, sort_keys=True))


test_set_id.__test__ = False  # not a pytest test, whatever its name says


def _num(d: dict[str, Any] | None, key: str) -> float | None:
    try:
        v = float((d or {}).get(key))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, cfg: RegistryConfig) -> Decision:
    """Promote the challenger or not. Each side: {"mae", "non0_acc2", "test_set_id"}. Pure."""
    c_mae, c_acc = _num(challenger, "mae"), _num(challenger, "non0_acc2")
    if champion is None:
        if c_mae is None or c_acc is None:
            return Decision(False, "invalid", "no champion yet, but the model's MAE / Non0-Acc2 are missing "
                                              "or not finite; it is not made champion")
        return Decision(True, "first", "no champion yet: the first model becomes champion")
    if c_mae is None or c_acc is None:
        return Decision(False, "invalid", "the challenger's MAE / Non0-Acc2 are missing or not finite")
    c_set, k_set = challenger.get("test_set_id"), champion.get("test_set_id")
    if not c_set or not k_set or c_set != k_set:
        return Decision(False, "incomparable",
                        f"incomparable: scored on test set {c_set or '?'}, the champion on {k_set or '?'}; "
                        "the champion stays")
    k_mae, k_acc = _num(champion, "mae"), _num(champion, "non0_acc2")
    if k_mae is None or k_acc is None:
        return Decision(False, "incomparable", "incomparable: the champion has no finite recorded MAE / Non0-Acc2")
    mae_gain, acc2_change = k_mae - c_mae, c_acc - k_acc
    deltas = {"mae_gain": mae_gain, "acc2_change": acc2_change}
    mae_ok = mae_gain > cfg.mae_margin + TOL
    acc_ok = acc2_change >= -(cfg.acc2_margin + TOL)
    if mae_ok and acc_ok:
        return Decision(True, "promoted", f"MAE {c_mae:.4f} < {k_mae:.4f} by {mae_gain:.4f} (> margin "
                                          f"{cfg.mae_margin}) and Non0-Acc2 {c_acc:.4f} vs {k_acc:.4f} "
                                          f"(drop within {cfg.acc2_margin})", deltas)
    if abs(mae_gain) <= TOL and abs(acc2_change) <= TOL:
        return Decision(False, "tie", f"tie (MAE {c_mae:.4f}, Non0-Acc2 {c_acc:.4f}): the champion stays", deltas)
    why = []
    if not mae_ok:
        why.append(f"MAE {c_mae:.4f} vs champion {k_mae:.4f} is not lower by more than {cfg.mae_margin}")
    if not acc_ok:
        why.append(f"Non0-Acc2 {c_acc:.4f} is below the champion's {k_acc:.4f} by more than {cfg.acc2_margin}")
    return Decision(False, "rejected", "; ".join(why), deltas)


# ---------------------------------------------------------------------------- MLflow side

def client_for(cfg: Config):
    import mlflow

    from psamf.tracking import tracking_uri

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(client, name: str) -> dict[str, str]:
    """alias -> version for a registered model ({} when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    aliases = rm.aliases or {}
    if isinstance(aliases, dict):
        return {str(k): str(v) for k, v in aliases.items()}
    return {str(a.alias): str(a.version) for a in aliases}


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="psamf: champion/challenger gated by psamf.registry.gate")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def versions_of_run(client, name: str, run_id: str) -> list:
    """Registered versions of `name` created from `run_id`, lowest version first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted((v for v in found if v.run_id == run_id), key=lambda v: int(v.version))


def _model_id(model_uri: str) -> str | None:
    """The LoggedModel id of a `models:/m-...` URI (MLflow 3), else None."""
    if model_uri.startswith("models:/m-"):
        return model_uri[len("models:/"):].split("/")[0]
    return None


def recorded(mv) -> dict[str, Any]:
    """What the gate recorded on a version: {"mae", "non0_acc2", "test_set_id", ...} from its tags."""
    tags = mv.tags or {}
    out: dict[str, Any] = {"version": str(mv.version), "test_set_id": tags.get(GATE + "test_set_id")}
    for k in HEADLINE:
        out[k] = _num(tags, GATE + k)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v)


LOCK_ENV = "PSAMF_REGISTRY_LOCK_URL"
SOURCE = GATE + "source_sha256"  # the registered file's content: a retried task finds its version


def gate_lock(cfg: Config, model_name: str):
    """The lock around 'read @champion, decide, move the alias' for `model_name`: on the tracking
    store itself when it is a database (sqlite file lock, PostgreSQL advisory lock), else on the
    database named by $PSAMF_REGISTRY_LOCK_URL (a tracking *server* hides its store; on the
    cluster the register task points this at the PostgreSQL it already uses for Optuna)."""
    import logging

    from psamf import tracking
    from psamf.locks import NamedLock

    url = os.environ.get(LOCK_ENV) or tracking.tracking_uri(cfg)
    if url.startswith(("http://", "https://", "databricks", "file:")) or "://" not in url:
        logging.getLogger(__name__).warning(
            "registry: no lock for %s; set $%s so that concurrent registrations are serialized",
            url.split("://")[0], LOCK_ENV)
        return contextlib.nullcontext()
    return NamedLock(url, f"psamf-registry:{model_name}", LOCK_ENV if os.environ.get(LOCK_ENV) else "tracking.uri")


def versions_with_source(client, name: str, source_key: str) -> list:
    """Versions of `name` registered from the file with this content hash, lowest first."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{SOURCE}` = '{source_key}'")
    return sorted(found, key=lambda v: int(v.version))


def _recorded_decision(tags: dict[str, str]) -> Decision:
    """The decision a crashed registration wrote before it moved the alias."""
    return Decision(promote=tags.get(GATE + "promoted") == "true", verdict=tags[GATE + "decision"],
                    reason=tags.get(GATE + "reason", ""),
                    deltas={k: float(tags[GATE + k]) for k in ("mae_gain", "acc2_change") if GATE + k in tags})


def register(cfg: Config, run_id: str, model_uri: str, metrics: dict[str, float], test_set_id: str,
             model_name: str, source_key: str | None = None) -> dict[str, Any]:
    """Create (once per run, and once per source file) a registry version of `model_uri`, gate it
    against @champion, move the aliases.

    Under `gate_lock`, so two registrations never decide against the same old champion. The
    order makes a crash at any step safe to rerun: the decision and its numbers are written as
    tags first (`gate.decision`), then the alias moves, then `gate.verdict` marks it done; a
    rerun that finds a version without a verdict applies the recorded decision."""
    client = client_for(cfg)
    _ensure_model(client, model_name)
    with gate_lock(cfg, model_name):
        existing = versions_of_run(client, model_name, run_id) or (
            versions_with_source(client, model_name, source_key) if source_key else [])
        duplicate = bool(existing)
        if existing and (existing[0].tags or {}).get(GATE + "verdict"):
            return _result(model_name, existing[0], _aliases(client, model_name), duplicate=True)
        if existing:
            mv = existing[0]  # created but never gated (a crash in between): gate it now
        else:
            mv = client.create_model_version(model_name, source=model_uri, run_id=run_id,
                                             model_id=_model_id(model_uri),
                                             tags={SOURCE: source_key} if source_key else None)
            # another process registering the same run without a lock: the lower version wins
            same = versions_of_run(client, model_name, run_id)
            if same and int(same[0].version) < int(mv.version):
                client.delete_model_version(model_name, mv.version)
                return register(cfg, run_id, model_uri, metrics, test_set_id, model_name, source_key)
        version = str(mv.version)
        aliases = _aliases(client, model_name)
        tags = mv.tags or {}
        # Decided before a crash: apply that decision, unless @champion moved on since (then decide anew).
        if GATE + "decision" in tags and aliases.get(CHAMPION) in (version, tags.get(GATE + "compared_to") or None):
            d = _recorded_decision(tags)
            champ_version = tags.get(GATE + "compared_to") or None
            compared = champ_version or ""
            metrics = {k[len(TEST):]: float(v) for k, v in tags.items() if k.startswith(TEST)} or metrics
            test_set_id = tags.get(GATE + "test_set_id", test_set_id)
        else:
            champ_version = aliases.get(CHAMPION)
            champion = None
            if champ_version is not None and champ_version != version:
                champion = recorded(client.get_model_version(model_name, champ_version))
            challenger = {"mae": metrics.get("mae"), "non0_acc2": metrics.get("non0_acc2"),
                          "test_set_id": test_set_id}
            d = decide(challenger, champion, cfg.registry)
            compared = champion["version"] if champion else ""
            decided = {GATE + "mae": metrics.get("mae"), GATE + "non0_acc2": metrics.get("non0_acc2"),
                       GATE + "test_set_id": test_set_id, GATE + "promoted": d.promote,
                       GATE + "reason": d.reason, GATE + "compared_to": compared,
                       GATE + "mae_margin": cfg.registry.mae_margin, GATE + "acc2_margin": cfg.registry.acc2_margin,
                       **{GATE + k: v for k, v in d.deltas.items()},
                       **{TEST + k: v for k, v in metrics.items()}}
            for k, v in decided.items():
                client.set_model_version_tag(model_name, version, k, _fmt(v))
            client.set_model_version_tag(model_name, version, GATE + "decision", d.verdict)  # last: the record is whole
        if d.promote:
            client.set_registered_model_alias(model_name, CHAMPION, version)
            if aliases.get(CHALLENGER) == version:
                client.delete_registered_model_alias(model_name, CHALLENGER)
        else:
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        client.set_model_version_tag(model_name, version, GATE + "verdict", d.verdict)  # done
    run_tags = {RUN + "model": model_name, RUN + "version": version, RUN + "alias": d.alias,
                RUN + "verdict": d.verdict, RUN + "promoted": d.promote, RUN + "reason": d.reason,
                RUN + "test_set_id": test_set_id, RUN + "compared_to": compared,
                **{RUN + k: v for k, v in d.deltas.items()}}
    for k, v in run_tags.items():
        client.set_tag(run_id, k, _fmt(v))
    mv = client.get_model_version(model_name, version)
    return _result(model_name, mv, _aliases(client, model_name), duplicate=duplicate, decision=d,
                   previous_champion=champ_version)


def _result(name: str, mv, aliases: dict[str, str], duplicate: bool, decision: Decision | None = None,
            previous_champion: str | None = None) -> dict[str, Any]:
    tags = mv.tags or {}
    out = {"model_name": name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
           "duplicate": duplicate, "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
           "champion_version": aliases.get(CHAMPION), **recorded(mv)}
    if decision is not None:
        out.update(promoted=decision.promote, verdict=decision.verdict, reason=decision.reason,
                   deltas=decision.deltas, previous_champion=previous_champion)
    else:  # a duplicate: report what was decided the first time
        out.update(promoted=tags.get(GATE + "promoted") == "true", verdict=tags.get(GATE + "verdict"),
                   reason=tags.get(GATE + "reason"),
                   deltas={k: _num(tags, GATE + k) for k in ("mae_gain", "acc2_change") if GATE + k in tags},
                   previous_champion=tags.get(GATE + "compared_to") or None)
    return out


def list_versions(cfg: Config, model_name: str) -> dict[str, Any]:
    """Every version of a registered model with its gate tags and aliases (for `psamf compare`)."""
    client = client_for(cfg)
    aliases = _aliases(client, model_name)
    if not aliases and not _exists(client, model_name):
        return {"model_name": model_name, "registered": False, "champion": None, "versions": []}
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version)):
        tags = mv.tags or {}
        rows.append({"version": str(mv.version), "run_id": mv.run_id, "created": mv.creation_timestamp,
                     "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                     "champion": aliases.get(CHAMPION) == str(mv.version),
                     "verdict": tags.get(GATE + "verdict"), "test_set_id": tags.get(GATE + "test_set_id"),
                     "metrics": {k[len(TEST):]: _num(tags, k) for k in sorted(tags) if k.startswith(TEST)}})
    return {"model_name": model_name, "registered": True, "champion": aliases.get(CHAMPION),
            "challenger": aliases.get(CHALLENGER), "versions": rows}


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def promote(cfg: Config, model_name: str, version: str, reason: str) -> dict[str, Any]:
    """Move @champion by hand (e.g. after an `incomparable` verdict), recording the reason as a version tag."""
    from mlflow.exceptions import MlflowException

    from psamf.errors import InputError

    client = client_for(cfg)
    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise InputError("--version", f"{model_name} has no version {version!r}") from None
        raise
    aliases = _aliases(client, model_name)
    client.set_model_version_tag(model_name, str(version), GATE + "manual_promotion", reason or "manual")
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    if aliases.get(CHALLENGER) == str(version):
        client.delete_registered_model_alias(model_name, CHALLENGER)
    return {"model_name": model_name, "version": str(mv.version), "previous_champion": aliases.get(CHAMPION),
            "reason": reason}



# ---------------------------------------------------------------------------- the `register` stage

MODELS = ("mult", "psamf")


def registered_name(cfg: Config, which: str) -> str:
    if which not in MODELS:
        from psamf.errors import InputError

        raise InputError("--model", f"unknown model {which!r} (choose from {', '.join(MODELS)})")
    return cfg.registry.mult_model if which == "mult" else cfg.registry.psamf_model


def register_stage(cfg: Config, which: str, run_id: str | None = None, held_out: str | None = None,
                   model_dir: str | None = None) -> dict[str, Any]:
    """Log a trained model as pyfunc, score that logged model on its test set, gate it.

    which="mult": the pretrain[held_out] model (default: the first LOO user); its test set is
    the held-out speaker's segments, scored as a cold-start (UNKNOWN) user, which is exactly
    the LOO baseline. which="psamf": psamf_train's model, on the registry.eval_split split
    (valid by default). The gate chooses the champion, so the score it reads is a selection
    score, not an unbiased estimate of the champion's error.
    run_id: log into this existing run (e.g. the training run) instead of a new `register`
    stage run; registering the same run twice then returns the first decision without
    logging anything again.
    """
    import contextlib

    import mlflow
    import numpy as np

    from psamf import tracking
    from psamf.registry import serving
    from psamf.data.prepared import load_prepared
    from psamf.registry.evaluation import evaluate_logged_model
    from psamf.errors import InputError

    if not tracking.enabled():
        raise InputError("PSAMF_TRACKING", "register needs MLflow tracking; unset PSAMF_TRACKING=off")
    name = registered_name(cfg, which)
    ds = load_prepared(cfg.data.prepared_path)
    if which == "mult":
        from psamf.mult.pretrain import pretrain_dir

        user = held_out or ds.loo_users(1)[0]
        model_dir = model_dir or str(pretrain_dir(cfg, user))
        idx = np.flatnonzero(ds.segments["speaker_id"].astype(str).to_numpy() == str(user))
        if not len(idx):
            raise InputError("--held-out", f"speaker {user!r} is not in the {cfg.data.corpus} corpus")
        log_model, test_name = serving.log_mult_model, f"held-out speaker {user}"
    else:
        user = None
        split = cfg.registry.eval_split
        idx = np.flatnonzero(ds.segments["split"].to_numpy() == split)
        if not len(idx):
            raise InputError(cfg.data.prepared_path, f"the {split} split is empty (registry.eval_split)")
        log_model, test_name = serving.log_psamf_model, f"{split} split"
    tsid = dataset_test_set_id(ds, idx)
    from psamf.fingerprint import file_sha256

    model_file = Path(model_dir) / "model.pt" if which == "mult" else serving.psamf_model_path(cfg, model_dir)
    source_key = file_sha256(model_file) if model_file.is_file() else None
    client = client_for(cfg)
    # A retried task (or a rerun) registers the same file: return its version, create none.
    done = [v for v in (versions_of_run(client, name, run_id) if run_id else [])
            + (versions_with_source(client, name, source_key) if source_key else [])
            if (v.tags or {}).get(GATE + "verdict")]
    if done:
        return _result(name, done[0], _aliases(client, name), duplicate=True)

    tags = {"registry_model": name, "test_set_id": tsid, "test_set": test_name, "av_simulated": ds.av_simulated}
    if user is not None:
        tags["loo_user"] = user
    active = mlflow.active_run()
    if run_id and active is not None and active.info.run_id == run_id:
        ctx = contextlib.nullcontext(active)
    elif run_id:
        tracking.ensure_experiment(cfg)
        ctx = mlflow.start_run(run_id=run_id, nested=active is not None)
    else:
        ctx = tracking.stage_run(cfg, "register", f"register[{which}]", tags)
    with ctx as run:
        if run_id:
            tracking.set_tags(tags)
        info = log_model(cfg, model_dir)
        metrics = evaluate_logged_model(info, serving.dataset_frame(ds, idx), ds.segments["label"].to_numpy()[idx],
                                        name=f"{cfg.data.corpus}-{cfg.registry.eval_split if user is None else user}",
                                        source=str(cfg.data.prepared_path), digest=tsid)
        # the evaluation logged every metric once (MLflow's names, psamf/<key> for the rest)
        result = register(cfg, run.info.run_id, info.model_uri, metrics, tsid, name, source_key)
        # What the number on the version page is: the gate chose on it, so it is no unbiased estimate.
        score = f"selection score on the {test_name}: the gate chose on it; not an unbiased estimate"
        client.set_model_version_tag(name, result["version"], GATE + "score", score)
        result["score"] = score
    result["model_uri"] = info.model_uri
    result["metrics"] = metrics
    return result
