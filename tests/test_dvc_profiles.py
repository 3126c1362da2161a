"""`dvc repro` on a profile that moves the corpus: DVC resolves ${...} from params.yaml's top-level
keys and knows nothing of psamf's profile merge, so dvc.yaml reads the profile's paths from
dvc_vars.yaml (`psamf dvc-vars`). Here: `profile: paper` (corpus mosi), its sizes cut to the smoke
profile's, on a small MOSI-layout corpus made from the synthetic one, in a throwaway repo copy.
`dvc stage list` must name the mosi paths, and the stages that write corpus-named outputs (tune,
train) must end with every output they declare present.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.pipeline import BIN, copy_worktree, env_for

pytestmark = pytest.mark.slow
CORPUS_STAGES = ("ingest", "validate", "personality", "tune", "train")  # `dvc repro train` runs these


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _paper_at_smoke_sizes(params: dict) -> dict:
    """`profile: paper` with the smoke profile's sizes, paper's corpus (mosi) read from the repo."""
    smoke = copy.deepcopy(params["profiles"]["smoke"])
    smoke["data"] = {**smoke.get("data", {}), "corpus": params["profiles"]["paper"]["data"]["corpus"],
                     "mosi_dir": "data/raw/mosi"}
    smoke["personality"] = {**smoke.get("personality", {}), "corpus": "synthetic"}  # no First Impressions here
    return {**params, "profile": "paper", "profiles": {**params["profiles"], "paper": smoke}}


def _mosi_fixture(repo: Path, env: dict[str, str]) -> None:
    """The synthetic corpus in CMU-MOSI's SDK layout and names (data/raw/mosi), tracked by DVC."""
    from psamf.data.layout import csd_name

    _run([str(BIN / "psamf"), "data", "synth"], repo, env)
    synth, mosi = repo / "data" / "raw" / "synthetic", repo / "data" / "raw" / "mosi"
    mosi.mkdir(parents=True)
    for role in ("labels", "audio", "visual"):
        shutil.copyfile(synth / csd_name("synthetic", role), mosi / csd_name("mosi", role))
    for name in ("transcripts.csv", "standard_folds.json"):
        shutil.copyfile(synth / name, mosi / name)
    _run([sys.executable, "-m", "dvc", "add", "-q", "data/raw"], repo, env)


def _declared_outs(repo: Path, stage: str) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        (st,) = [s for s in r.index.stages if getattr(s, "name", None) == stage]
        return [str(o.def_path) for o in st.outs]


def test_dvc_repro_on_the_paper_profile_writes_what_dvc_yaml_declares(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_worktree(repo)
    env = {**env_for(tmp_path), "PSAMF_TRACKING": "off", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "2"}
    params = _paper_at_smoke_sizes(yaml.safe_load((repo / "params.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo, env)
    _mosi_fixture(repo, env)

    _run([sys.executable, "-m", "psamf.cli.main", "dvc-vars"], repo, env)
    resolved = yaml.safe_load((repo / "dvc_vars.yaml").read_text())
    assert resolved["resolved"]["corpus"] == "mosi" and resolved["loo_ranks"] == [0, 1], resolved
    listed = _run([sys.executable, "-m", "dvc", "stage", "list"], repo, env).stdout
    assert "models/psamf/mosi/model.pt" in listed and "synthetic" not in listed, listed

    out = _run([sys.executable, "-m", "dvc", "repro", "train"], repo, env, timeout=1500)
    for stage in CORPUS_STAGES:
        assert f"Running stage '{stage}'" in out.stdout, (stage, out.stdout[-3000:])
        missing = [o for o in _declared_outs(repo, stage) if not (repo / o).exists()]
        assert not missing, f"{stage}: declared outputs not written: {missing}"
    assert (repo / "data" / "prepared" / "mosi").is_dir() and (repo / "reports" / "tune" / "mosi").is_dir()
    # the later stages read the same corpus-named paths
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        for st in r.index.stages:
            paths = [str(d.def_path) for d in st.deps] + [str(o.def_path) for o in st.outs] + [st.cmd or ""]
            assert not any("synthetic" in p for p in paths), (getattr(st, "name", None), paths)
        assert "models/psamf/mosi/model.pt" in [str(d.def_path) for s in r.index.stages
                                                if getattr(s, "name", None) == "register" for d in s.deps]
