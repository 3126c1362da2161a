"""CPUs this process may really use: a pod's cgroup limit, not the node's core count.

`os.cpu_count()` reports the node's cores (64 on a big GPU node) while the pod may be capped at
2 by its CPU limit; sizing torch threads or worker processes by it oversubscribes the quota and
every thread gets throttled.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 `cpu.max`, else v1), or None when unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().split()[:2] + [""]
            if quota != "max":
                return int(quota) / int(period or 100_000)
            return None
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.is_file() and p.is_file():
            quota = int(q.read_text())
            return quota / int(p.read_text()) if quota > 0 else None
    except (OSError, ValueError):
        return None
    return None


def cpu_count(cgroup_root: str | Path = CGROUP_ROOT) -> int:
    """min(affinity, ceil(cgroup quota)), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def skip_final_gc_at_exit() -> None:
    """Leave the objects alive at exit to the OS instead of a last garbage collection.

    Python's shutdown walks every live object once more; with torch, mlflow and sklearn loaded
    that took about a second per process here, and a pipeline run starts a process per task
    (`python -m bench.pipeline --fresh` shows the effect). An atexit hook runs before that walk,
    and freezing the heap there moves every object out of its reach. Nothing is lost: Python never
    promised `__del__` for objects alive at exit, the stages close their files and runs
    themselves, and later atexit hooks (MLflow's flush) still run. Called by the process entry
    points psamf owns (the CLI, a pipeline task), never on import."""
    global _final_gc_skipped
    if _final_gc_skipped:  # once per process (in-process CLI calls, e.g. tests, come here again)
        return
    import atexit
    import gc

    atexit.register(gc.freeze)
    _final_gc_skipped = True


_final_gc_skipped = False
