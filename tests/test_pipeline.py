"""Orchestration: the compiled KFP YAML has the DAG, GPU requests, ParallelFor and secrets the
design asks for; the skip-if-unchanged decision; DVC's dag mirrors the same stages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from psamf.pipeline import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "psamf.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _tasks(spec: dict) -> dict:
    """Every task in the pipeline, nested DAGs (If, ParallelFor) included."""
    out = {}
    for comp in [spec["root"], *spec["components"].values()]:
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def test_dag_order(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    for name in ("decide", "start-run", "ingest", "validate", "personality", "pretrain", "finetune", "loo-report",
                 "tune", "train", "register"):
        assert name in tasks, name

    def deps(t):
        d = set(tasks[t].get("dependentTasks", []))
        for arg in tasks[t].get("inputs", {}).get("artifacts", {}).values():
            prod = arg.get("taskOutputArtifact", {}).get("producerTask")
            if prod:
                d.add(prod)
        return d

    assert "ingest" in deps("validate")
    assert "validate" in deps("personality")
    loop = next(n for n, t in tasks.items() if "iteratorPolicy" in t)  # pretrain/finetune run inside it
    assert {"validate", "ingest"} <= deps(loop)
    assert "pretrain" in deps("finetune")
    assert loop in deps("loo-report")
    assert {"personality"} <= deps("tune") and "tune" in deps("train")
    assert "train" in deps("register") and "loo-report" in deps("register")
    # The stages run in a nested pipeline fed the parent run id by start_run: inside it (and so
    # inside the loop) the id is a component input, which kfp.local resolves (see pipelines/training.py).
    assert "start-run" in deps("psamf-train-and-register")
    loop_body = spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]
    assert "componentInputParameter" in loop_body["pretrain"]["inputs"]["parameters"]["parent_run_id"]
    # Everything after `decide` sits inside the skip-if-unchanged condition, which reads decide's
    # single output (kfp.local cannot resolve a named output there and would skip the branch).
    cond = [t for t in tasks.values() if "triggerPolicy" in t]
    assert len(cond) == 1 and "decide-Output" in str(cond[0]["triggerPolicy"]["condition"])
    assert "decide" in deps(next(n for n, t in tasks.items() if "triggerPolicy" in t))


def test_parallel_for_over_rank_slots(compiled):
    spec, _ = compiled
    loops = [t for t in _tasks(spec).values() if "iteratorPolicy" in t]
    assert len(loops) == 1 and loops[0]["iteratorPolicy"]["parallelismLimit"] == 4
    assert "loo_ranks" in str(loops[0]["parameterIterator"])
    assert spec["root"]["inputDefinitions"]["parameters"]["loo_ranks"]["defaultValue"] == list(range(10))


def test_gpu_requests_on_training_stages_only(compiled):
    spec, _ = compiled
    execs = spec["deploymentSpec"]["executors"]
    gpu = {name.replace("exec-", "") for name, e in execs.items()
           if e["container"].get("resources", {}).get("accelerator")}
    assert gpu == {"personality", "pretrain", "finetune", "tune", "train"}
    for name, e in execs.items():
        res = e["container"]["resources"]
        assert res.get("cpuLimit") and res.get("memoryLimit"), name
        if name.replace("exec-", "") in gpu:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"


def test_secrets_node_selector_and_image(compiled):
    _, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {s["secretName"] for s in k8s["exec-tune"]["secretAsEnv"]} == {"psamf-mlflow", "psamf-s3", "psamf-postgres"}
    assert all("psamf-mlflow" in {s["secretName"] for s in e.get("secretAsEnv", [])} for e in k8s.values())
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in k8s["exec-ingest"]


def test_components_use_the_psamf_image_without_installing_kfp(compiled):
    spec, _ = compiled
    for name, e in spec["deploymentSpec"]["executors"].items():
        c = e["container"]
        assert c["image"].split(":")[0].endswith("psamf"), name
        assert "pip install" not in " ".join(c.get("command", [])), name


def test_retries_and_caching(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["decide"]["cachingOptions"] == {}  # the skip decision is never cached
    assert tasks["start-run"]["cachingOptions"] == {}  # nor the parent run
    assert tasks["pretrain"]["cachingOptions"]["enableCache"] is True


def test_skip_when_data_and_code_unchanged(smoke_cfg, monkeypatch, tmp_path):
    import mlflow

    from psamf.orchestration import finish_pipeline_run, retrain_decision, start_pipeline_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    assert retrain_decision("smoke", [], "a", force=False) == "run"
    first = start_pipeline_run("smoke", [], "a")
    assert retrain_decision("smoke", [], "b", force=False) == "run"  # `first` never completed: nothing to skip against
    finish_pipeline_run(smoke_cfg, first)
    assert retrain_decision("smoke", [], "c", force=False) == "skip"
    client = mlflow.MlflowClient()
    skipped = client.search_runs([client.get_run(first).info.experiment_id], "tags.skipped = 'true'")
    assert len(skipped) == 1 and "unchanged" in skipped[0].data.tags["decision_reason"]
    assert skipped[0].data.tags["pipeline_fingerprint"] == client.get_run(first).data.tags["pipeline_fingerprint"]
    assert retrain_decision("smoke", [], "d", force=True) == "run"
    assert retrain_decision("smoke", ["mult.d_model=8"], "e", force=False) == "run"


def test_dvc_stages_mirror_the_pipeline():
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    for stage in ("ingest", "validate", "pretrain@0", "pretrain@9", "finetune@0", "loo_report"):
        assert stage in names, stage
