"""Personalized MulT stages: multi-user pretraining, per-user few-shot fine-tuning, LOO.

    pretrain(cfg, held_out)  MulT + User Adapter on every speaker except `held_out`
                             (70/30 train/valid by segment, early stopping on valid MAE)
    finetune(cfg, user)      R seeded draws of a k-shot support set from the user's
                             segments; the rest is the user's test set. Per draw:
                               baseline  the pretrained model as is (user unseen -> UNKNOWN token)
                               fs_ua     fine-tuned, lr_base for MulT, lr_adapter for the adapter
                               fs_ua_kd  same, loss (1-λ)·L1(ŷ, y_old) + λ·L1(ŷ, y),
                                         y_old from the frozen pretrained model
    loo(cfg)                 both, for the K users with the most segments, then the report.

The paper blamed its mixed results on biased 5-shot draws; repeating the draw R times
and reporting per-user means with 95% CIs is how we answer that.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from psamf.checkpoints import store_for
from psamf.config import Config
from psamf.data.prepared import PreparedDataset, load_prepared
from psamf.data.text_features import text_features
from psamf.errors import InputError
from psamf.io import write_json
from psamf.metrics import regression_metrics
from psamf.models.mult import MulT
from psamf.models.user_adapter import UserVocab
from psamf.stats import bootstrap_ci, mean_ci, paired_diff
from psamf.training import Batch, config_fingerprint, fit, predict, seed_everything, tensor_digest
from psamf import tracking

log = logging.getLogger(__name__)
VARIANTS = ("baseline", "fs_ua", "fs_ua_kd")


def mult_inputs(cfg: Config) -> tuple[PreparedDataset, dict[str, torch.Tensor], str]:
    """The prepared dataset plus its MulT tensors (text features computed/cached once)."""
    ds = load_prepared(cfg.data.prepared_path)
    text, text_mask, source = text_features(cfg, ds)
    tensors = {
        "text": torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32)),
        "audio": torch.from_numpy(ds.arrays["audio"]),
        "visual": torch.from_numpy(ds.arrays["visual"]),
        "text_mask": torch.from_numpy(text_mask.astype(bool)),
        "audio_mask": torch.from_numpy(ds.arrays["audio_mask"]),
        "visual_mask": torch.from_numpy(ds.arrays["visual_mask"]),
        "label": torch.from_numpy(ds.segments["label"].to_numpy(np.float32)),
    }
    # A segment whose modality has no frame at all would leave MulT nothing to attend to.
    for m in ("text", "audio", "visual"):
        empty = ~tensors[f"{m}_mask"].any(1)
        tensors[f"{m}_mask"][empty, 0] = True
    return ds, tensors, source


def take(tensors: dict[str, torch.Tensor], idx: np.ndarray, users: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out = {k: v[torch.as_tensor(idx, dtype=torch.long)] for k, v in tensors.items()}
    if users is not None:
        out["user"] = users
    return out


def forward(model: MulT, b: Batch) -> torch.Tensor:
    return model(b["text"], b["audio"], b["visual"], b.get("user"), b["text_mask"], b["audio_mask"], b["visual_mask"])


def l1_loss(model: MulT, b: Batch) -> torch.Tensor:
    return nn.functional.l1_loss(forward(model, b), b["label"])


def build_model(cfg: Config, tensors: dict[str, torch.Tensor], n_users: int) -> MulT:
    return MulT.from_config(cfg.mult, cfg.user_adapter, tensors["text"].shape[-1], tensors["audio"].shape[-1],
                            tensors["visual"].shape[-1], n_users)


def pretrain_dir(cfg: Config, held_out: str) -> Path:
    return Path(cfg.pretrain.out_dir) / cfg.data.corpus / held_out


def _check_user(ds: PreparedDataset, user: str) -> None:
    if user not in set(ds.segments["speaker_id"]):
        raise InputError("--user", f"speaker {user!r} is not in the {ds.manifest.get('corpus')} corpus")


def pretrain(cfg: Config, held_out: str, on_epoch=None) -> dict[str, Any]:
    """Train MulT + User Adapter on every speaker but `held_out`; resumable; writes model.pt."""
    pc = cfg.pretrain
    ds, tensors, source = mult_inputs(cfg)
    _check_user(ds, held_out)
    out = pretrain_dir(cfg, held_out)
    keep = np.flatnonzero(ds.segments["speaker_id"].to_numpy() != held_out)
    rng = np.random.default_rng(pc.seed)
    perm = rng.permutation(keep)
    n_valid = int(round(len(perm) * pc.valid_frac))
    valid_idx, train_idx = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    vocab = UserVocab(ds.segments["speaker_id"].iloc[keep])
    users = vocab.encode(ds.segments["speaker_id"].tolist())
    train = take(tensors, train_idx, users[train_idx])
    valid = take(tensors, valid_idx, users[valid_idx])
    seed_everything(pc.seed)
    model = build_model(cfg, tensors, len(vocab))
    opt = torch.optim.Adam(model.parameters(), lr=pc.lr, fused=True)

    def evaluate(m: MulT) -> dict[str, float]:
        p = predict(m, valid, forward)
        met = regression_metrics(p, valid["label"].numpy())
        return {"valid_mae": met["mae"], "valid_corr": met["corr"], "valid_non0_acc2": met["non0_acc2"]}

    # out_dir is not a setting: a retried pod resumes into a new output dir
    fp = config_fingerprint({"mult": asdict(cfg.mult), "ua": asdict(cfg.user_adapter),
                             "pretrain": {k: v for k, v in asdict(pc).items() if k != "out_dir"}, "seq_len": cfg.data.seq_len, "held_out": held_out, "text": source,
                             "n": len(train_idx), "data": tensor_digest(tensors)})
    store = store_for(cfg, "pretrain", fp)
    with tracking.stage_run(cfg, "pretrain", f"pretrain[{held_out}]",
                            {"loo_user": held_out, "av_simulated": ds.av_simulated, "text_features": source}):
        log_epoch = tracking.epoch_logger()
        result = fit(model, opt, train, l1_loss, evaluate, epochs=pc.epochs, batch_size=pc.batch_size,
                     patience=pc.patience, seed=pc.seed, ckpt_dir=out, fingerprint=fp, grad_clip=pc.grad_clip,
                     on_epoch=on_epoch or log_epoch, desc=f"pretrain[{held_out}]", store=store)
        tracking.log_metrics({"best_valid_mae": result.best_score, "best_epoch": result.best_epoch})
    torch.save({"state_dict": model.state_dict(), "users": vocab.to_list(), "text_source": source,
                "dims": {m: int(tensors[m].shape[-1]) for m in ("text", "audio", "visual")}},
               out / "model.tmp")
    (out / "model.tmp").replace(out / "model.pt")
    report = {"held_out": held_out, "corpus": cfg.data.corpus, "av_simulated": ds.av_simulated,
              "text_features": source, "n_train": len(train_idx), "n_valid": len(valid_idx),
              "best_epoch": result.best_epoch, "best_valid_mae": result.best_score,
              "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
              "history": result.history, "valid": result.history[result.best_epoch] if result.history else {}}
    write_json(out / "metrics.json", report)
    if store is not None:  # model.pt is written: a retry from here on needs no checkpoint
        store.discard()
    return report


def load_pretrained(cfg: Config, held_out: str, tensors: dict[str, torch.Tensor]) -> tuple[MulT, UserVocab]:
    path = pretrain_dir(cfg, held_out) / "model.pt"
    if not path.is_file():
        raise InputError(path, f"no pretrained model; run `psamf pretrain --held-out {held_out}` first")
    state = torch.load(path, weights_only=False)
    vocab = UserVocab.from_list(state["users"])
    model = build_model(cfg, tensors, len(vocab))
    model.load_state_dict(state["state_dict"])
    return model.eval(), vocab


def draw_support(labels: np.ndarray, k: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    """Indices (into labels) of a k-shot support set.

    stratified: cut the user's label range [min, max] into k equal-width bins and take one
    sample from each non-empty bin (topping up at random when fewer than k bins are
    occupied), so the support set spans the range instead of piling up where labels are dense.
    """
    n = len(labels)
    if not stratified:
        return np.sort(rng.choice(n, size=k, replace=False))
    edges = np.linspace(labels.min(), labels.max(), k + 1)
    bin_of = np.clip(np.searchsorted(edges, labels, side="right") - 1, 0, k - 1)
    chosen = [int(rng.choice(np.flatnonzero(bin_of == b))) for b in range(k) if (bin_of == b).any()]
    rest = np.setdiff1d(np.arange(n), chosen)
    chosen += rng.choice(rest, size=k - len(chosen), replace=False).tolist()
    return np.sort(np.array(chosen))


def _finetune_copy(base: MulT, vocab: UserVocab, user: str, cfg: Config, support: Batch,
                   teacher_pred: torch.Tensor | None, seed: int) -> tuple[MulT, int]:
    """Fine-tune a copy of `base` on the support set; KD when teacher_pred is given."""
    fc = cfg.finetune
    model = copy.deepcopy(base)
    v = UserVocab.from_list(vocab.to_list())
    row = v.add(user)
    if model.user_adapter is not None:
        model.user_adapter.grow(len(v))
    batch = dict(support, user=torch.full((len(support["label"]),), row, dtype=torch.long))
    opt = torch.optim.Adam(model.param_groups(fc.lr_base, fc.lr_adapter), fused=True)
    torch.manual_seed(seed)
    # Dropout off by default: with 5 samples in one full batch, dropout noise dominates the
    # gradient and Adam (which normalizes step size) turns it into a random walk of every
    # weight; measured on the demo corpus it cost 0.06-0.19 MAE. `finetune.dropout` restores it.
    model.train(fc.dropout)
    for _ in range(fc.epochs):  # 5 samples: one full batch per step, a fixed number of steps
        opt.zero_grad(set_to_none=True)
        pred = forward(model, batch)
        loss = nn.functional.l1_loss(pred, batch["label"])
        if teacher_pred is not None:
            loss = (1 - fc.kd_lambda) * nn.functional.l1_loss(pred, teacher_pred) + fc.kd_lambda * loss
        loss.backward()
        opt.step()
    return model.eval(), row


def finetune(cfg: Config, user: str, write: bool = True, report_path: str | Path | None = None) -> dict[str, Any]:
    """baseline / FS-UA / FS-UA-KD on R seeded support draws for one held-out user.

    One `finetune` MLflow run spans the work (its duration is the stage's compute): per-draw
    metrics with step = draw, the means, and the report JSON, written to `report_path` (default
    <finetune.out_dir>/<corpus>/<user>.json; nothing is written with write=False)."""
    fc = cfg.finetune
    with tracking.stage_run(cfg, "finetune", f"finetune[{user}]", {"loo_user": user}):
        report = _finetune_draws(cfg, user)
        tracking.set_tags({"av_simulated": report["av_simulated"], "text_features": report["text_features"]})
        for r, d in enumerate(report["per_draw"]):
            tracking.log_metrics({f"{v}_{k}": d[v][k] for v in VARIANTS for k in ("mae", "non0_acc2")}, step=r)
        tracking.log_metrics({f"{v}_{k}_mean": report["summary"][v][k]["mean"] for v in VARIANTS
                              for k in report["summary"][v]})
        tracking.log_metrics({f"{k}_mean": d["mean"] for k, d in report["paired"].items()})
        tracking.log_metrics({f"cold_start_{k}": d["mean"] for k, d in report["cold_start"].items()})
        if write or report_path is not None:
            path = write_json(report_path or Path(fc.out_dir) / cfg.data.corpus / f"{user}.json", report)
            tracking.log_artifact(path, "loo")
    return report


def _finetune_draws(cfg: Config, user: str) -> dict[str, Any]:
    fc = cfg.finetune
    ds, tensors, source = mult_inputs(cfg)
    _check_user(ds, user)
    base, vocab = load_pretrained(cfg, user, tensors)
    idx = np.flatnonzero(ds.segments["speaker_id"].to_numpy() == user)
    if len(idx) <= fc.k_shot:
        raise InputError("--user", f"speaker {user!r} has {len(idx)} segments; need more than k_shot={fc.k_shot}")
    labels = tensors["label"][idx].numpy()
    draws: list[dict[str, Any]] = []
    unknown = torch.zeros(len(idx), dtype=torch.long)
    with torch.no_grad():
        teacher_all = torch.from_numpy(predict(base, take(tensors, idx, unknown), forward))
    for r in tqdm(range(fc.draws), desc=f"finetune[{user}]", unit="draw", leave=False):
        rng = np.random.default_rng([fc.seed, r])
        s = draw_support(labels, fc.k_shot, rng, fc.stratified)
        t = np.setdiff1d(np.arange(len(idx)), s)
        support = take(tensors, idx[s])
        preds = {"baseline": teacher_all[t].numpy()}
        for variant, kd in (("fs_ua", None), ("fs_ua_kd", teacher_all[s])):
            model, row = _finetune_copy(base, vocab, user, cfg, support, kd, seed=fc.seed * 1000 + r)
            test = take(tensors, idx[t], torch.full((len(t),), row, dtype=torch.long))
            preds[variant] = predict(model, test, forward)
        y = labels[t]
        draws.append({"draw": r, "support": ds.segments["segment_id"].iloc[idx[s]].tolist(),
                      "n_test": len(t), **{v: regression_metrics(preds[v], y) for v in VARIANTS}})
    summary = {v: {k: mean_ci([d[v][k] for d in draws]) for k in draws[0][v]} for v in VARIANTS}
    paired = {f"{v}_vs_baseline_mae": paired_diff([d["baseline"]["mae"] for d in draws], [d[v]["mae"] for d in draws])
              for v in ("fs_ua", "fs_ua_kd")}
    # Cold start: what the user gets before giving any labels (the unknown-user row on all of
    # their segments); one prediction per segment, so its CI is a bootstrap over segments.
    cold_start = bootstrap_ci(teacher_all.numpy(), labels, seed=fc.seed)
    return {"user": user, "corpus": cfg.data.corpus, "av_simulated": ds.av_simulated, "text_features": source,
            "k_shot": fc.k_shot, "draws": fc.draws, "stratified": fc.stratified, "kd_lambda": fc.kd_lambda,
            "n_segments": int(len(idx)), "summary": summary, "paired": paired, "cold_start": cold_start,
            "per_draw": draws}


# ---- the LOO experiment ------------------------------------------------------------------------

# The paper's Tables 1-3 columns, and the convention behind each (see psamf.metrics.CONVENTIONS).
TABLE_METRICS = {"MAE": "mae", "Corr": "corr", "Acc7": "acc7", "F1": "non0_f1", "Acc2": "non0_acc2"}
VARIANT_NAMES = {"baseline": "Baseline (no fine-tuning)", "fs_ua": "FS-UA", "fs_ua_kd": "FS-UA-KD"}


def loo_users(cfg: Config) -> list[str]:
    return load_prepared(cfg.data.prepared_path).loo_users(cfg.data.loo_users)


def loo(cfg: Config, users: list[str] | None = None, on_user=None) -> dict[str, Any]:
    """Pretrain + finetune for every LOO user, then write the report."""
    users = users or loo_users(cfg)
    with tracking.stage_run(cfg, "loo", "loo", {"loo_users": ",".join(users)}):
        for u in tqdm(users, desc="loo", unit="user"):
            with tracking.stage_run(cfg, "loo-user", f"user[{u}]", {"loo_user": u}, log_params=False):
                pre = pretrain(cfg, u)
                fin = finetune(cfg, u)
            if on_user:
                on_user(u, pre, fin)
        summary = loo_report(cfg, users)
        log_loo_summary(summary)
        return summary


def tracked_loo_report(cfg: Config, report_files: list[Path] | None = None,
                       out_dir: str | Path | None = None) -> dict[str, Any]:
    """`loo_report` in its own `loo` stage run (the DVC and KFP report stages)."""
    with tracking.stage_run(cfg, "loo", "loo-report"):
        summary = loo_report(cfg, report_files=report_files, out_dir=out_dir)
        log_loo_summary(summary)
    return summary


def log_loo_summary(summary: dict[str, Any]) -> None:
    """The LOO averages and report files (tables, chart) into the active MLflow run."""
    tracking.set_tags({"av_simulated": summary["av_simulated"]})
    tracking.log_metrics({f"{v}_{m}": x for v, ms in summary["averages"].items() for m, x in ms.items()})
    tracking.log_metrics({"kd_mae_gain": summary["kd_mae_gain"]["mean"]})
    for f in summary["files"].values():
        tracking.log_artifact(f, "loo_report")


def user_at_rank(cfg: Config, rank: int) -> str | None:
    """The LOO user at `rank` (0 = most segments), or None when rank >= data.loo_users.

    DVC and KFP fan out over rank slots, which are static, rather than speaker ids, which
    depend on the corpus."""
    users = loo_users(cfg)
    return users[rank] if 0 <= rank < len(users) else None


def skipped_slot_file(cfg: Config, out_dir: str | Path, rank: int) -> Path:
    """Where a stage whose outputs go to `out_dir` puts a skipped slot's marker: beside the
    `<out_dir>/<corpus>/...` outputs it would have written, so report globs find it."""
    return Path(out_dir) / cfg.data.corpus / f"rank{rank}-skipped.json"


def write_skipped_slot(cfg: Config, path: str | Path, rank: int) -> Path:
    """The one marker of a rank slot at or beyond data.loo_users, written by the CLI (so dvc)
    and KFP alike: the stage finishes with an output, and is_skipped_slot tells it from a report."""
    return write_json(path, {"skipped": True, "rank": rank, "loo_users": cfg.data.loo_users})


def is_skipped_slot(report: Any) -> bool:
    return isinstance(report, dict) and report.get("skipped") is True


def loo_report(cfg: Config, users: list[str] | None = None, report_files: list[Path] | None = None,
               out_dir: str | Path | None = None) -> dict[str, Any]:
    """Collect per-user finetune reports into the paper's table layout (+ CIs), CSV, MD, PNG.

    By default reads <finetune.out_dir>/<corpus>/<user>.json for the LOO users; orchestrators
    that kept each user's report elsewhere pass `report_files` instead (skipped slots' markers
    among them are passed over)."""
    import html
    import json

    from psamf.reports import (ci_bars, conventions_note, embed_png, html_page, html_table, markdown_table,
                               provenance, save_figure, write_csv, write_text)

    if report_files is not None:
        by_user = {}
        for p in report_files:
            try:
                rep = json.loads(Path(p).read_text())
                if is_skipped_slot(rep):
                    continue
                by_user[rep["user"]] = rep
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputError(p, f"not a finetune report ({e})") from None
        order = {u: i for i, u in enumerate(loo_users(cfg))}
        users = sorted(by_user, key=lambda u: (order.get(u, len(order)), u))
        reports = [by_user[u] for u in users]
    else:
        users = users or loo_users(cfg)
        base = Path(cfg.finetune.out_dir) / cfg.data.corpus
        reports = []
        for u in users:
            p = base / f"{u}.json"
            if not p.is_file():
                raise InputError(p, f"missing; run `psamf finetune --user {u}` first")
            reports.append(json.loads(p.read_text()))
    if not reports:
        raise InputError("loo", "no finetune reports to collect")
    rows = []
    for r in reports:
        for v in VARIANTS:
            row = {"user": r["user"], "variant": v, "n_segments": r["n_segments"], "draws": r["draws"]}
            for name, key in TABLE_METRICS.items():
                ci = r["summary"][v][key]
                row.update({name: ci["mean"], f"{name}_lo": ci["lo"], f"{name}_hi": ci["hi"]})
            rows.append(row)
    df = pd.DataFrame(rows)
    averages = {v: {name: float(df.loc[df.variant == v, name].mean()) for name in TABLE_METRICS} for v in VARIANTS}
    # Paired per-user difference baseline - FS-UA-KD in mean MAE: > 0 means KD helped.
    diffs = [r["summary"]["baseline"]["mae"]["mean"] - r["summary"]["fs_ua_kd"]["mae"]["mean"] for r in reports]
    kd_gain = paired_diff(diffs, [0.0] * len(diffs))
    first = reports[0]
    md = [f"# Personalized MulT: leave-one-out few-shot results ({len(users)} users)\n",
          provenance(cfg.data.corpus, first["av_simulated"], first["text_features"]),
          f"\n{first['k_shot']}-shot support sets, {first['draws']} seeded draws per user "
          f"({'stratified' if first['stratified'] else 'uniform'}), KD λ = {first['kd_lambda']}. "
          "Cells are per-user means over draws; `[lo, hi]` is the 95% t-interval over draws.\n"]
    page = [f"<h1>Personalized MulT: leave-one-out few-shot results ({len(users)} users)</h1>",
            f"<p>{html.escape(md[1] + md[2])}</p>"]
    for v in VARIANTS:
        sub = df[df.variant == v]
        table_rows = [{"User": r.user, **{n: f"{getattr(r, n):.3f} [{getattr(r, n + '_lo'):.3f}, {getattr(r, n + '_hi'):.3f}]"
                                         for n in TABLE_METRICS}} for r in sub.itertuples()]
        md += [f"\n## {VARIANT_NAMES[v]}\n", markdown_table(
            table_rows + [{"User": "**Average**", **{n: f"**{averages[v][n]:.3f}**" for n in TABLE_METRICS}}],
            ["User", *TABLE_METRICS])]
        page += [f"<h2>{VARIANT_NAMES[v]}</h2>", html_table(
            table_rows + [{"User": "Average", **{n: f"{averages[v][n]:.3f}" for n in TABLE_METRICS}}],
            ["User", *TABLE_METRICS])]
    md += [f"\nMean over users of (baseline MAE − FS-UA-KD MAE): {kd_gain['mean']:.4f} "
           f"[{kd_gain['lo']:.4f}, {kd_gain['hi']:.4f}] (95% CI; > 0 means KD fine-tuning lowered MAE).\n",
           "\n" + conventions_note(list(TABLE_METRICS.values()))]
    out = Path(out_dir) if out_dir else Path(cfg.finetune.out_dir) / cfg.data.corpus
    write_csv(out / "loo_table.csv", df)
    write_text(out / "loo_report.md", "".join(md))
    fig = ci_bars(df, users, "variant", VARIANT_NAMES, {"Acc2": "Acc2 (Non0)", "MAE": "MAE (lower is better)"},
                  "Personalized MulT, leave-one-out few-shot (mean ± 95% CI over draws)")
    save_figure(fig, out / "loo_chart.png")
    # The same tables and the chart as one page: what the KFP UI renders for the loo-report task.
    page += [f"<p>{html.escape(md[-2].strip())}</p>", embed_png(out / "loo_chart.png", "per-user Acc2 and MAE"),
             f"<pre>{html.escape(md[-1].strip())}</pre>"]
    write_text(out / "loo_report.html", html_page("psamf LOO report", "\n".join(page)))
    summary = {"corpus": cfg.data.corpus, "av_simulated": first["av_simulated"], "users": users,
               "averages": averages, "kd_mae_gain": kd_gain, "metric_keys": TABLE_METRICS,
               "k_shot": first["k_shot"], "draws": first["draws"], "kd_lambda": first["kd_lambda"],
               "text_features": first["text_features"],
               # Everything but the draws, so `psamf report` needs this one file, not K of them.
               "per_user": {r["user"]: {k: v for k, v in r.items() if k != "per_draw"} for r in reports},
               "files": {k: str(out / f) for k, f in (("csv", "loo_table.csv"), ("markdown", "loo_report.md"),
                                                       ("chart", "loo_chart.png"), ("html", "loo_report.html"))}}
    write_json(out / "loo_summary.json", summary)
    # Flat numbers for `dvc metrics show` / KFP Metrics: <variant>.<metric>.
    write_json(out / "metrics.json", {**{f"{v}.{m}": round(x, 6) for v, ms in averages.items() for m, x in ms.items()},
                                      "kd_mae_gain": round(kd_gain["mean"], 6)})
    return summary
