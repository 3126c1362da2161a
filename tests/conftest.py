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


def pytest_collection_modifyitems(config, items):
    """The end-to-end (`slow`) tests first: under xdist's loadfile each file goes whole to the next
    free worker, so the minutes-long files start at once, on different workers, and the short ones
    fill in around them instead of queueing behind them at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept


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
