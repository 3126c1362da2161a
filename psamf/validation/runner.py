"""Run the suites with great-expectations 1.x and write the report.

One ephemeral GX context per run holds one pandas data source with three dataframe assets
(segments, arrays, loo_users), one suite + ValidationDefinition + Checkpoint per table, each
Checkpoint with an UpdateDataDocsAction for the local site. The site is a
TupleFilesystemStoreBackend under `<out_dir>/data_docs`, built in a temp dir and swapped in
whole, so a reader never sees half a report or pages from an older run.

`<out_dir>/summary.json` (written atomically, last) holds: success, corpus, av_simulated,
counts, the manifest's non-finite policy and replaced counts next to what is left in the
arrays, the LOO users, every expectation's result, the failure lines and the data docs path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psamf.config import Config
from psamf.data.prepared import MODALITIES, SPLITS, PreparedDataset, load_prepared
from psamf.io import atomic_dir, write_json
from psamf.validation import tables as T
from psamf.validation.suites import INDEX_COLUMNS, LABEL_RANGE, TABLES, Check, build_checks, expected_dims

SITE = "psamf"
MAX_EXAMPLES = 5
COLUMN_KWARGS = ("column", "column_A", "column_B")  # an entry's `columns`, not its `kwargs`
RESULT_KEYS = ("element_count", "unexpected_count", "missing_count", "observed_value")
EXPECTED_KWARGS = ("value", "min_value", "max_value", "type_list")  # quoted after "observed"
REQUIRED_MANIFEST_KEYS = {
    "corpus": "which corpus this is",
    "av_simulated": "whether the acoustic/visual features are simulated",
    "folds": "{split: [video ids]}, the official folds",
    "video_end": "{video_id: seconds}, each video's extent",
    "nonfinite": "{policy, audio, visual}, what ingest did with NaN/-inf",
}


@dataclass
class ValidationResult:
    success: bool
    failures: list[str]
    summary_path: Path
    data_docs_index: Path | None  # None when run with data_docs=False
    summary: dict[str, Any] = field(default_factory=dict)


def default_out_dir(cfg: Config) -> Path:
    return Path("reports/validation") / cfg.data.corpus


def validate(cfg: Config, out_dir: str | Path | None = None) -> ValidationResult:
    """Validate `<prepared_dir>/<corpus>`; InputError if it is missing or unreadable."""
    from psamf import tracking

    ds = load_prepared(cfg.data.prepared_path)
    with tracking.stage_run(cfg, "validate", tags={"av_simulated": ds.av_simulated}):
        result = validate_dataset(ds, cfg, out_dir if out_dir is not None else default_out_dir(cfg))
        tracking.log_metrics({"validation_success": float(result.success), "validation_failures": len(result.failures)})
        tracking.set_tags({"validation": "passed" if result.success else "failed"})
        tracking.log_artifact(result.summary_path, "validation")
        if result.data_docs_index is not None:
            tracking.log_artifact(result.data_docs_index.parent, "validation/data_docs")
    return result


def validate_dataset(ds: PreparedDataset, cfg: Config, out_dir: str | Path, *,
                     data_docs: bool = True) -> ValidationResult:
    """Validate an in-memory dataset; write `<out_dir>/summary.json` and (unless
    data_docs=False, which saves about 0.6 s of HTML rendering) `<out_dir>/data_docs/`."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    frames = {
        "segments": T.segments_table(ds),
        "arrays": T.arrays_table(ds),
        "loo_users": T.loo_users_table(ds, cfg.data.loo_users),
    }
    gx = _import_gx()
    checks = build_checks(cfg, ds.manifest)
    docs_dir = out_dir / "data_docs"
    av = (ds.manifest or {}).get("av_simulated")
    about = f"corpus={cfg.data.corpus} av_simulated={'unknown' if av is None else str(bool(av)).lower()}"
    if data_docs:
        with atomic_dir(docs_dir) as tmp_docs:
            entries, tables = _run(gx, checks, frames, tmp_docs.resolve(), about)  # GX wants an absolute base_directory
        index_html: Path | None = docs_dir / "index.html"
    else:
        entries, tables = _run(gx, checks, frames, None, about)
        index_html = None
        shutil.rmtree(docs_dir, ignore_errors=True)  # no stale pages beside a new summary

    failures = _manifest_failures(ds.manifest) + [e["message"] for e in entries if "message" in e]
    if not failures and not all(t["success"] for t in tables.values()):  # cannot happen; never pass silently
        failures = [f"{e['table']}: {e['expectation']} failed ({e['description']})" for e in entries if not e["success"]]
    summary = _summary(ds, cfg, frames, entries, tables, failures, index_html)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary_path = write_json(out_dir / "summary.json", summary)
    return ValidationResult(success=not failures, failures=failures, summary_path=summary_path,
                            data_docs_index=index_html, summary=summary)


def _run(gx, checks: list[Check], frames: dict[str, pd.DataFrame], docs_dir: Path | None,
         about: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """One ephemeral context; per table a suite, a ValidationDefinition and a Checkpoint.
    `about` (corpus, AV simulated or not) becomes the run name and the suites' notes, so
    the data docs pages say it too. Returns every expectation's entry (by key) and each
    table's tally."""
    from great_expectations.core.run_identifier import RunIdentifier  # noqa: PLC0415

    # the run name is a path component of the docs pages: no '/' or spaces
    run_id = RunIdentifier(run_name=re.sub(r"[^A-Za-z0-9_.=-]+", "-", about).strip("-"))
    by_key = {c.key: c for c in checks}
    ctx = _context(gx, docs_dir)
    source = ctx.data_sources.add_pandas("prepared")
    actions = [gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=[SITE])] if docs_dir else []
    entries: list[dict[str, Any]] = []
    tables: dict[str, dict[str, Any]] = {}
    for table in TABLES:
        df = frames[table]
        batch = source.add_dataframe_asset(name=table).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(
            name=f"psamf_{table}", expectations=[c.expectation for c in checks if c.table == table],
            notes=f"psamf prepared dataset, table `{table}`: {about}. See psamf/validation/tables.py."))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"psamf_{table}", data=batch, suite=suite))
        index_cols = [c for c in INDEX_COLUMNS[table] if c in df.columns]
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"psamf_{table}", validation_definitions=[vd], actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_cols},
        ))
        run = checkpoint.run(batch_parameters={"dataframe": df}, run_id=run_id)
        (suite_result,) = run.run_results.values()  # one ValidationDefinition per Checkpoint
        entries += [_result_entry(by_key[r.expectation_config.meta["psamf_key"]], r, df) for r in suite_result.results]
        tables[table] = _table_tally(suite_result, len(df))
    if docs_dir:
        ctx.build_data_docs(site_names=[SITE])  # adds the suite pages and the index over all three
    return sorted(entries, key=lambda e: e["key"]), tables


# ---- GX plumbing --------------------------------------------------------------------------------

def _import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # noqa: PLC0415 - 3-4 s; only when validating
    import great_expectations.checkpoint  # noqa: F401,PLC0415

    return gx


def _context(gx, docs_dir: Path | None):
    from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: PLC0415

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is None:
        return ctx
    ctx.add_data_docs_site(site_name=SITE, site_config={
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    })
    return ctx


# ---- results -> entries and one-line failures ------------------------------------------------

def _table_tally(suite_result, rows: int) -> dict[str, Any]:
    """A table's line in the summary: GX's own statistics of its suite run."""
    stats = suite_result.statistics
    return {"rows": rows, "success": bool(suite_result.success),
            "evaluated": stats["evaluated_expectations"], "failed": stats["unsuccessful_expectations"]}


def _result_entry(check: Check, r, df: pd.DataFrame) -> dict[str, Any]:
    """One expectation's summary record; a failed one also gets its examples and failure line."""
    kwargs = r.expectation_config.kwargs
    columns = [kwargs[k] for k in COLUMN_KWARGS if k in kwargs]
    res = r.result or {}
    # not describe_dict(): it would convert the whole COMPLETE result (every offending row) only
    # to drop it, and it leaves out a failed metric's exception, which GX nests under the metric
    error = _exception_message(r.exception_info)
    entry: dict[str, Any] = _plain({
        "key": check.key, "table": check.table, "expectation": r.expectation_config.type, "columns": columns,
        "kwargs": {k: v for k, v in kwargs.items() if k != "batch_id" and k not in COLUMN_KWARGS},
        "description": check.description, "success": bool(r.success),
        **{k: res[k] for k in RESULT_KEYS if k in res}, **({"error": error} if error else {}),
    })
    missing = [c for c in columns if c not in df.columns]
    if not r.success and error and missing:
        # A column that is not there: its expect_column_to_exist line (or that of the source
        # column a derived one needs) is the failure; don't repeat it once per expectation.
        entry["skipped"] = f"column {', '.join(missing)} missing"
    elif not r.success:
        examples = _examples(check, res, df)
        entry["examples"] = [_example(label, quoted) for label, quoted in examples]
        entry["message"] = _message(check, entry, examples)
    return entry


def _message(check: Check, entry: dict[str, Any], examples: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """The one-line failure: table.column, expectation, what was checked and what was found."""
    where = f"{check.table}.{'/'.join(entry['columns'])}" if entry["columns"] else check.table
    head = f"{where}: {entry['expectation']} failed ({check.description})"
    if entry.get("error"):
        return f"{head}: could not run: {entry['error']}"
    if entry["expectation"] == "expect_column_to_exist":
        return f"{head}: the table has no column {entry['columns'][0]!r}"
    if "unexpected_count" in entry:
        shared, ex = _format_examples(examples)
        text = f"{head}: {entry['unexpected_count']} of {entry.get('element_count', '?')} rows"
        text += f" (those shown all have {shared})" if shared else ""
        return f"{text}, e.g. {ex}" if ex else text
    exp_txt = ", ".join(f"{k}={v}" for k, v in entry["kwargs"].items() if k in EXPECTED_KWARGS)
    return f"{head}: observed {entry.get('observed_value')!r}" + (f", expected {exp_txt}" if exp_txt else "")


def _examples(check: Check, res: dict[str, Any], df: pd.DataFrame) -> list[tuple[str, list[tuple[str, str]]]]:
    """(segment id or speaker, [(column, value), ...]) for the first few offending rows."""
    out = []
    for idx in (res.get("unexpected_index_list") or [])[:MAX_EXAMPLES]:
        if not isinstance(idx, dict):
            continue
        pos = idx.get("row")
        row = df.iloc[int(pos)] if pos is not None else idx
        quoted = [(c, _fmt(row[c])) for c in check.context
                  if c in row and not (c.endswith("_problem") and row[c] == "")]
        out.append((_row_label(check.table, idx), quoted))
    return out


def _example(label: str, quoted: list[tuple[str, str]]) -> str:
    """'id [c=v, ...]', or just the id when nothing is quoted."""
    return f"{label} [{', '.join(f'{c}={v}' for c, v in quoted)}]" if quoted else label


def _format_examples(examples: list[tuple[str, list[tuple[str, str]]]]) -> tuple[str, str]:
    """('c=v, ...' for values every example shares, 'id [c=v]; ...' with the rest)."""
    shared = []
    if len(examples) > 1:
        first = examples[0][1]
        shared = [cv for cv in first if all(cv in q for _, q in examples[1:])]
    parts = [_example(label, [cv for cv in quoted if cv not in shared]) for label, quoted in examples]
    return ", ".join(f"{c}={v}" for c, v in shared), "; ".join(parts)


def _row_label(table: str, idx: dict[str, Any]) -> str:
    if table == "loo_users":
        return f"speaker {_fmt(idx.get('speaker_id'))}"
    sid = idx.get("segment_id")
    if isinstance(sid, str) and sid:
        return sid
    return f"row {idx.get('row')}" + (f" (segment_id={_fmt(sid)})" if "segment_id" in idx else "")


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception").splitlines()[0]
    for v in info.values():  # {metric id: {...}} when a metric failed
        msg = _exception_message(v)
        if msg:
            return msg
    return None


def _manifest_failures(manifest: dict[str, Any]) -> list[str]:
    out = []
    for key, what in REQUIRED_MANIFEST_KEYS.items():
        if key not in (manifest or {}):
            out.append(f"manifest.json: missing key {key!r} ({what}); re-run `psamf data ingest`")
    return out


# ---- summary ------------------------------------------------------------------------------------

def _summary(ds: PreparedDataset, cfg: Config, frames: dict[str, pd.DataFrame], entries: list[dict[str, Any]],
             tables: dict[str, dict[str, Any]], failures: list[str], index_html: Path | None) -> dict[str, Any]:
    import great_expectations as gx  # noqa: PLC0415 - already imported

    seg, arr, loo = frames["segments"], frames["arrays"], frames["loo_users"]
    manifest = ds.manifest or {}
    nonfinite = manifest.get("nonfinite") if isinstance(manifest.get("nonfinite"), dict) else {}
    counts: dict[str, Any] = {"segments": int(len(seg))}
    for col, name in (("video_id", "videos"), ("speaker_id", "speakers")):
        if col in seg.columns:
            counts[name] = int(seg[col].nunique())
    if "split" in seg.columns:
        counts["splits"] = {s: int((seg["split"] == s).sum()) for s in SPLITS}
    return _plain({
        "success": not failures,
        "corpus": cfg.data.corpus,
        "manifest_corpus": manifest.get("corpus"),
        "av_simulated": manifest.get("av_simulated"),
        "profile": cfg.profile,
        "counts": counts,
        "orphan_transcripts": {"count": len(manifest.get("orphan_transcripts") or []),
                               "segment_ids": list(manifest.get("orphan_transcripts") or [])[:20]},
        "nonfinite": {
            "policy": nonfinite.get("policy"),
            "replaced_at_ingest": {m: nonfinite.get(m) for m in MODALITIES},
            "remaining": {m: int(arr[f"{m}_nonfinite"].sum()) for m in MODALITIES},
        },
        "loo_users": loo[["speaker_id", "n_segments"]].to_dict("records"),
        "thresholds": {
            "label_range": list(LABEL_RANGE),
            "video_end_tolerance_s": T.VIDEO_END_TOLERANCE_S,
            "audio_dim": expected_dims(cfg, manifest)["audio"],
            "visual_dim": expected_dims(cfg, manifest)["visual"],
            "seq_len": cfg.data.seq_len,
            "loo_users": cfg.data.loo_users,
            "min_user_segments": cfg.data.min_user_segments,
        },
        "tables": tables,
        "expectations": [{k: v for k, v in e.items() if k != "key"} for e in entries],
        "failures": failures,
        "data_docs": str(index_html) if index_html else None,
        "great_expectations": gx.__version__,
    })


def _plain(x: Any) -> Any:
    """JSON-safe: GX's own conversion (numpy to Python, NaN/NA to None, tuples to lists, str
    keys), then a JSON round trip, because GX keeps +-inf, which json.dumps would write as the
    non-standard `Infinity`: those become None as well."""
    from great_expectations.util import convert_to_json_serializable  # noqa: PLC0415 - loaded by now

    return json.loads(json.dumps(convert_to_json_serializable(x)), parse_constant=lambda _: None)


def _fmt(v: Any) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NA or v is pd.NaT:
        return "null"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str):
        s = v if len(v) <= 120 else v[:117] + "..."
        return repr(s)
    return str(v)
