"""Shared fixtures. Real corpora come from $PSAMF_SHARED_DATA (default ../shared/data)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PSAMF_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each (and in the stage processes
    # they start), or four threads fight over two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


# The longest files (measured: kfp.local e2e ~5 min, dvc e2e ~4 min, serially on 2 cores). xdist's
# loadfile queues files by test count, most first, so these one-test files would start last and
# run alone at the end; the scheduler below starts them first, one on each worker.
LONGEST_FIRST = ("tests/test_kfp_e2e.py", "tests/test_dvc_e2e.py")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for scope in reversed(LONGEST_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


@pytest.fixture(scope="session", autouse=True)
def isolated_tracking(tmp_path_factory):
    """Every test (and its subprocesses) tracks into a throwaway store, never ./mlruns.db."""
    root = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlruns.db"
    os.environ["PSAMF_ARTIFACT_ROOT"] = str(root / "artifacts")
    yield root


@pytest.fixture(autouse=True)
def _restore_environ(isolated_tracking):
    """Stage entry points set process env (the parent run, the data version) as a task process
    would; in this one pytest process, undo it after every test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data dir; tests that need it skip with the reason when it is absent."""
    if not (SHARED / "cmu-mosi" / "CMU_MOSI_Opinion_Labels.csd").is_file():
        pytest.skip(f"real corpora not found in {SHARED} (set PSAMF_SHARED_DATA)")
    return SHARED


@pytest.fixture
def smoke_cfg(tmp_path):
    """A smoke-profile config whose every output lands under tmp_path."""
    from psamf.config import load_config

    return load_config(REPO / "params.yaml", "smoke", [
        f"data.raw_dir={tmp_path}/raw",
        f"data.prepared_dir={tmp_path}/prepared",
        f"data.shared_dir={SHARED}",
        f"text_features.cache_dir={tmp_path}/cache",
    ])
