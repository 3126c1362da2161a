"""The expectation suites, one per table (see tables.py for what each column means).

Each check is a `Check`: the GX expectation, the table it runs on, a plain-words description
(shown in the data docs as the expectation's notes and used in failure lines) and the columns
to quote for each offending row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psamf.config import PICKLE_FORMATS, Config
from psamf.data.prepared import EMOTION_COLUMNS, MODALITIES, SEGMENT_COLUMNS, SPLITS
from psamf.validation.tables import VIDEO_END_TOLERANCE_S

LABEL_RANGE = (-3.0, 3.0)
EMOTION_RANGE = (0.0, 3.0)  # MOSEI: mean presence of each emotion over annotators, on a 0-3 scale
FLOAT_TYPES = ["float64", "float32", "float16", "int64", "int32"]  # numeric; ints are fine
STR_TYPES = ["str"]  # checked per value: the tables hold text as object columns

TABLES = ("segments", "arrays", "loo_users")
INDEX_COLUMNS = {"segments": ["row", "segment_id"], "arrays": ["row", "segment_id"],
                 "loo_users": ["rank", "speaker_id"]}


@dataclass
class Check:
    table: str
    key: str  # unique id, stored in the expectation's meta to match results back
    description: str
    expectation: Any
    context: list[str] = field(default_factory=list)  # columns quoted for offending rows


def expected_dims(cfg: Config, manifest: dict[str, Any] | None) -> dict[str, int]:
    """data.audio_dim / visual_dim; for a pickle corpus (data.format mmsa | mult) the file's own
    dims, which ingest recorded in the manifest, replace them."""
    d = cfg.data
    dims = {"audio": d.audio_dim, "visual": d.visual_dim}
    got = (manifest or {}).get("dims")
    if d.format in PICKLE_FORMATS and isinstance(got, dict):
        dims.update({m: got[m] for m in dims if isinstance(got.get(m), int)})
    return dims


def build_checks(cfg: Config, manifest: dict[str, Any] | None = None) -> list[Check]:
    import great_expectations as gx  # noqa: PLC0415 - caller sets GX env first

    E = gx.expectations
    d = cfg.data
    pickled = d.format in PICKLE_FORMATS  # ids <video>_<clip number>; a video may span splits (SIMS)
    checks: list[Check] = []

    def add(table: str, description: str, exp_cls: Any, context: list[str] | None = None, **kw: Any) -> None:
        key = f"{table}.{len(checks):02d}"
        exp = exp_cls(**kw, meta={"psamf_key": key}, notes=description)
        checks.append(Check(table, key, description, exp, context or []))

    # ---- segments: schema ---------------------------------------------------------------
    add("segments", "the table has at least one segment", E.ExpectTableRowCountToBeBetween, min_value=1)
    for col in SEGMENT_COLUMNS:
        add("segments", f"column {col} exists", E.ExpectColumnToExist, column=col)
    for col in ("segment_id", "video_id", "speaker_id", "split", "text"):
        add("segments", f"{col} values are strings", E.ExpectColumnValuesToBeInTypeList,
            [col], column=col, type_list=STR_TYPES)
    for col in ("label", "start", "end"):
        add("segments", f"{col} is numeric", E.ExpectColumnValuesToBeInTypeList, column=col, type_list=FLOAT_TYPES)
    for col in ("segment_id", "video_id", "speaker_id", "split", "label", "text", "start", "end"):
        add("segments", f"{col} is never null", E.ExpectColumnValuesToNotBeNull, [col], column=col)
    # ---- segments: ids --------------------------------------------------------------------
    add("segments", "segment ids are unique", E.ExpectColumnValuesToBeUnique, ["row"], column="segment_id")
    if pickled:
        add("segments", "segment ids look like <video_id>_<clip number>", E.ExpectColumnValuesToMatchRegex,
            [], column="segment_id", regex=r"^.+_[0-9]+$")
    else:
        add("segments", "segment ids look like <video_id>_<n> with n >= 1", E.ExpectColumnValuesToMatchRegex,
            [], column="segment_id", regex=r"^.+_[1-9][0-9]*$")
    add("segments", "segment id is exactly <this row's video_id>_<n>", E.ExpectColumnValuesToBeInSet,
        ["video_id", "id_video"], column="id_matches_video", value_set=[True])
    # ---- segments: labels and text ----------------------------------------------------------
    add("segments", f"label within [{LABEL_RANGE[0]:g}, {LABEL_RANGE[1]:g}]", E.ExpectColumnValuesToBeBetween,
        ["label"], column="label", min_value=LABEL_RANGE[0], max_value=LABEL_RANGE[1])
    add("segments", "text is not empty", E.ExpectColumnValueLengthsToBeBetween, ["text"], column="text", min_value=1)
    add("segments", "text is not only whitespace", E.ExpectColumnValuesToMatchRegex,
        ["text"], column="text", regex=r"\S")
    if d.corpus == "mosei" and not pickled:  # MMSA/MulT pickles carry sentiment only
        _emotion_checks(add, E)
    # ---- segments: intervals inside the video -----------------------------------------------
    add("segments", "start >= 0", E.ExpectColumnValuesToBeBetween, ["start"], column="start", min_value=0)
    add("segments", "end >= start", E.ExpectColumnPairValuesAToBeGreaterThanB, ["start", "end"],
        column_A="end", column_B="start", or_equal=True)
    add("segments", "the video's end is known (manifest['video_end'])", E.ExpectColumnValuesToNotBeNull,
        ["video_id"], column="video_end")
    add("segments", f"end <= video_end + {VIDEO_END_TOLERANCE_S:g}s", E.ExpectColumnValuesToBeBetween,
        ["end", "video_end"], column="end_overrun", max_value=VIDEO_END_TOLERANCE_S)
    # ---- segments: splits -------------------------------------------------------------------
    add("segments", f"split is one of {', '.join(SPLITS)}", E.ExpectColumnValuesToBeInSet,
        ["split"], column="split", value_set=list(SPLITS))
    add("segments", "split is one of the video's splits in manifest['folds']" if pickled else
        "split equals the video's fold in manifest['folds']", E.ExpectColumnValuesToBeInSet,
        ["video_id", "split", "fold_split"], column="split_matches_fold", value_set=[True])

    # ---- arrays: one row per segment ----------------------------------------------------------
    dims = expected_dims(cfg, manifest)
    for m in MODALITIES:
        add("arrays", f"{m} is present for every segment (array, {m}_len, {m}_mask, >= 1 real step)",
            E.ExpectColumnValuesToBeInSet, [f"{m}_problem", f"{m}_len", f"{m}_real_steps"],
            column=f"{m}_present", value_set=[True])
        add("arrays", f"{m} feature dim equals {'the file' if pickled else f'data.{m}_dim'} = {dims[m]}", E.ExpectColumnValuesToBeInSet,
            [f"{m}_dim"], column=f"{m}_dim", value_set=[dims[m]])
        add("arrays", f"{m} has data.seq_len = {d.seq_len} steps", E.ExpectColumnValuesToBeInSet,
            [f"{m}_steps"], column=f"{m}_steps", value_set=[d.seq_len])
        add("arrays", f"{m} length > 0", E.ExpectColumnValuesToBeBetween, [f"{m}_len"],
            column=f"{m}_len", min_value=1)
        add("arrays", f"{m} mask has min({m}_len, T) real steps", E.ExpectColumnValuesToBeInSet,
            [f"{m}_len", f"{m}_real_steps", f"{m}_steps"], column=f"{m}_mask_matches_len", value_set=[True])
        add("arrays", f"no NaN or +-inf left in {m}", E.ExpectColumnValuesToBeBetween, [f"{m}_nonfinite"],
            column=f"{m}_nonfinite", min_value=0, max_value=0)

    # ---- LOO users ------------------------------------------------------------------------------
    add("loo_users", f"there are data.loo_users = {d.loo_users} speakers to leave out",
        E.ExpectTableRowCountToEqual, value=d.loo_users)
    add("loo_users", f"each LOO user has >= data.min_user_segments = {d.min_user_segments} segments",
        E.ExpectColumnValuesToBeBetween, ["n_segments"], column="n_segments", min_value=d.min_user_segments)
    return checks


def _emotion_checks(add: Any, E: Any) -> None:
    """MOSEI's emotion columns: kept, so checked like the label (present, finite, in range)."""
    lo, hi = EMOTION_RANGE
    for col in EMOTION_COLUMNS:
        add("segments", f"column {col} exists", E.ExpectColumnToExist, column=col)
        add("segments", f"{col} is never null (NaN)", E.ExpectColumnValuesToNotBeNull, [col], column=col)
        add("segments", f"{col} within [{lo:g}, {hi:g}] (so finite)", E.ExpectColumnValuesToBeBetween,
            [col], column=col, min_value=lo, max_value=hi)
