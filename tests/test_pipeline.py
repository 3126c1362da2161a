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
    from psamf.cli.kfp import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "psamf.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _tasks(spec: dict) -> dict:
    """Every task in the pipeline, nested DAGs (If, ParallelFor) included."""
    out = {}
    for comp in [spec["root"], *spec["components"].values()]:
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def _deps(tasks: dict, t: str) -> set:
    d = set(tasks[t].get("dependentTasks", []))
    for arg in tasks[t].get("inputs", {}).get("artifacts", {}).values():
        prod = arg.get("taskOutputArtifact", {}).get("producerTask")
        if prod:
            d.add(prod)
    return d


STAGES = ("fingerprint", "fetch-data", "ingest", "validate", "personality", "pretrain", "finetune", "loo-report",
          "tune-worker", "tune-report", "train", "register", "report")


def test_dag_order(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    for name in STAGES:
        assert name in tasks, name
    assert "decide" not in tasks and "start-run" not in tasks  # KFP's cache does the skipping
    deps = lambda t: _deps(tasks, t)  # noqa: E731
    assert "fetch-data" in deps("ingest") and "ingest" in deps("validate")
    assert "validate" in deps("personality") and "fetch-data" in deps("personality")  # its corpus is in `raw`
    loops = {n: t for n, t in tasks.items() if "iteratorPolicy" in t or "parameterIterator" in t}
    loo = next(n for n, t in loops.items() if "loo_ranks" in str(t["parameterIterator"]))
    workers = next(n for n, t in loops.items() if "tune_workers" in str(t["parameterIterator"]))
    assert {"validate", "ingest"} <= deps(loo)
    assert "pretrain" in deps("finetune")
    assert loo in deps("loo-report")
    assert "personality" in deps(workers)  # the first worker creates the study: no task before them for it
    assert workers in deps("tune-report") and "tune-report" in deps("train")
    assert "train" in deps("register") and "loo-report" in deps("register")
    assert {"train", "loo-report", "register"} <= deps("report")  # last: it completes the parent run
    downstream = {t for t in tasks if "report" in deps(t)}
    assert not downstream, downstream
    # The stages run in a nested pipeline fed the fingerprint: inside it (and so inside the loops)
    # it is a component input, which kfp.local resolves (see pipelines/training.py).
    assert "fingerprint" in deps("psamf-train-and-register")
    loop_body = spec["components"][tasks[loo]["componentRef"]["name"]]["dag"]["tasks"]
    assert "componentInputParameter" in loop_body["pretrain"]["inputs"]["parameters"]["fingerprint"]


def test_parallel_for_over_loo_ranks_and_tune_workers(compiled):
    spec, _ = compiled
    loops = [t for t in _tasks(spec).values() if "parameterIterator" in t]
    loo = [t for t in loops if "loo_ranks" in str(t["parameterIterator"])]
    assert len(loo) == 1 and loo[0]["iteratorPolicy"]["parallelismLimit"] == 4
    assert any("tune_workers" in str(t["parameterIterator"]) for t in loops)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["loo_ranks"]["defaultValue"] == list(range(10))  # data.loo_users (see the K test below)
    assert params["tune_workers"]["defaultValue"] == [0]


def test_gpu_only_for_pretrain_tune_workers_and_train(compiled):
    spec, _ = compiled
    execs = spec["deploymentSpec"]["executors"]
    gpu = {name.replace("exec-", "") for name, e in execs.items()
           if e["container"].get("resources", {}).get("accelerator")}
    assert gpu == {"pretrain", "tune-worker", "train"}
    for name, e in execs.items():
        res = e["container"]["resources"]
        assert res.get("cpuLimit") and res.get("memoryLimit"), name
        if name.replace("exec-", "") in gpu:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"


def _secrets(k8s: dict, task: str) -> set[str]:
    return {s["secretName"] for s in k8s.get(f"exec-{task}", {}).get("secretAsEnv", [])}


def test_each_task_mounts_only_the_secrets_it_uses(compiled):
    _, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for t in ("tune-worker", "tune-report"):
        assert "psamf-optuna" in _secrets(k8s, t), t
    assert not any("psamf-optuna" in _secrets(k8s, t) for t in STAGES if not t.startswith("tune-") and t != "register")
    lock = [s for s in k8s["exec-register"]["secretAsEnv"] if s["secretName"] == "psamf-optuna"]
    assert lock[0]["keyToEnv"] == [{"envVar": "PSAMF_REGISTRY_LOCK_URL", "secretKey": "PSAMF_OPTUNA_STORAGE"}]
    assert _secrets(k8s, "fetch-data") == {"psamf-s3"}  # the data remote; it tracks nothing
    for t in ("pretrain", "train", "personality", "tune-worker"):  # durable checkpoints in S3
        assert "psamf-s3" in _secrets(k8s, t), t
    for t in ("ingest", "validate", "finetune", "loo-report", "register", "tune-report"):
        assert "psamf-s3" not in _secrets(k8s, t), t  # MLflow proxies its artifacts: no S3 key needed
    for t in STAGES:
        if t != "fetch-data":
            assert "psamf-mlflow" in _secrets(k8s, t), t
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in k8s["exec-ingest"] and "nodeSelector" not in k8s["exec-finetune"]


def test_hf_cache_volume_on_the_encoder_stages(compiled):
    spec, platform = compiled
    from pipelines.training import ENCODER_STAGES, HF_CACHE_MOUNT, HF_CACHE_PVC

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    execs = spec["deploymentSpec"]["executors"]
    for t in ENCODER_STAGES:
        mounts = k8s[f"exec-{t}"]["pvcMount"]
        assert [(m["constant"], m["mountPath"]) for m in mounts] == [(HF_CACHE_PVC, HF_CACHE_MOUNT)], t
        assert {"name": "HF_HOME", "value": HF_CACHE_MOUNT} in execs[f"exec-{t}"]["container"]["env"], t
    assert "pvcMount" not in k8s.get("exec-pretrain", {})


def test_components_use_the_psamf_image_without_installing_kfp(compiled):
    spec, _ = compiled
    for name, e in spec["deploymentSpec"]["executors"].items():
        c = e["container"]
        assert c["image"].split(":")[0].endswith("psamf"), name
        assert "pip install" not in " ".join(c.get("command", [])), name


def test_caching_on_content_keyed_inputs_only(compiled):
    """Every task but `fingerprint` is cached, and a cached task's inputs are the config
    (profile, overrides, params text), the fingerprint, loop items and artifacts of cached
    tasks: nothing fresh per run (no run id) that would make every cache lookup miss."""
    spec, _ = compiled
    tasks = _tasks(spec)
    assert tasks["fingerprint"]["cachingOptions"] == {}  # always runs: it notices changed data or code
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    allowed = {"profile", "overrides", "params_yaml", "fingerprint", "rank", "data_source", "data_version"}
    for name in STAGES:
        if name == "fingerprint":
            continue
        t = tasks[name]
        assert t["cachingOptions"] == {"enableCache": True}, name
        params = set(t.get("inputs", {}).get("parameters", {}))
        assert params <= allowed, (name, params - allowed)
        assert {"profile", "overrides", "params_yaml", "fingerprint"} <= params, name  # config reaches every task
    # the fingerprint task is the only one that sees the (per-run) run name
    assert "run_name" in tasks["fingerprint"]["inputs"]["parameters"]


def test_pipeline_arguments_carry_the_params_file_and_profile(tmp_path):
    from psamf.cli.kfp import pipeline_arguments

    params = tmp_path / "p.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("profile: demo", "profile: smoke", 1))
    args = pipeline_arguments(None, ["mult.d_model=8"], params)
    assert args["profile"] == "smoke"  # the file's profile key is honoured
    assert args["params_yaml"] == params.read_text() and args["overrides"] == ["mult.d_model=8"]
    assert args["loo_ranks"] == [0, 1] and args["tune_workers"] == [0]
    assert pipeline_arguments("demo", [], params, ranks=3)["loo_ranks"] == [0, 1, 2]


def test_a_task_reads_the_pipeline_params_text_not_the_local_file(tmp_path, monkeypatch):
    from psamf.stages import stage_config

    monkeypatch.chdir(tmp_path)  # a pod: no params.yaml in the working dir
    text = (REPO / "params.yaml").read_text().replace("d_model: 30", "d_model: 10", 1)
    cfg = stage_config("smoke", ["user_adapter.hidden=7"], text)
    assert cfg.mult.d_model == 16  # the smoke profile's value, merged over the file's 10
    assert cfg.user_adapter.hidden == 7 and cfg.profile == "smoke"
    assert stage_config("demo", [], text).mult.d_model == 10


def _dvc_stages() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_dvc_stages_mirror_the_pipeline():
    names = _dvc_stages()
    for stage in ("ingest", "validate", "pretrain@0", "pretrain@9", "finetune@0", "loo_report"):
        assert stage in names, stage


def test_one_k_the_config_dvc_yaml_and_the_pipeline_default_have_the_same_loo_slots(compiled, tmp_path):
    """K (data.loo_users) is set in params.yaml alone: the dataclass default equals it (test_config),
    dvc.yaml's foreach reads dvc_vars.yaml, which `psamf dvc-vars` writes from it, and the KFP
    default is computed from the config when the pipeline is compiled."""
    from psamf.config import Config, load_config, loo_rank_slots

    slots = loo_rank_slots(load_config(REPO / "params.yaml"))
    assert slots == loo_rank_slots(Config()) == list(range(Config().data.loo_users))
    spec, _ = compiled
    assert spec["root"]["inputDefinitions"]["parameters"]["loo_ranks"]["defaultValue"] == slots
    names = _dvc_stages()
    for stage in ("pretrain", "finetune"):
        assert sorted(int(n.split("@")[1]) for n in names if n.startswith(f"{stage}@")) == slots, stage
    # the committed vars file is what the generator writes now
    subprocess.run([sys.executable, "-m", "psamf.cli.main", "dvc-vars", "--params", str(REPO / "params.yaml"),
                    "--out", str(tmp_path / "vars.yaml")], check=True, capture_output=True)
    assert (tmp_path / "vars.yaml").read_text() == (REPO / "dvc_vars.yaml").read_text()


def test_kfp_local_output_is_one_line_per_task_with_the_rest_in_a_log():
    import io
    import time

    from psamf.cli.kfp import TaskLines

    log, term = io.StringIO(), io.StringIO()
    out = TaskLines(log, term)
    out.write("06:00:01.1 - INFO - Executing task \x1b[96m'ingest'\x1b[0m\n    {\"executor_input\": {}}\n")
    out.write("    ingest:  50%|#####     | 4/8 [00:01<00:01]\r\n06:00:02.2 - INFO - Task \x1b[96m'ingest'\x1b[0m ")
    out.write("finished with status \x1b[92mSUCCESS\x1b[0m\n")
    out.write("06:00:03 - ERROR - Task 'validate' finished with status FAILURE\n")
    for _ in range(2):  # two iterations of a ParallelFor: same name, side by side
        out.write("06:00:04 - INFO - Executing task 'pretrain'\n")
    time.sleep(0.05)
    out.write("06:00:05 - INFO - Task 'pretrain' finished with status SUCCESS\n" * 2)
    out.write("06:00:06.3 - INFO - Task train cache hit (key=0123456789ab); skipping execution.\n")
    lines = term.getvalue().splitlines()
    assert lines.pop() == "[ 5] train          cached      0.0 s" and out.cached == 1  # kfp.local's cache served it
    assert len(lines) == 4 and all(float(ln.split()[-2]) >= 0.05 for ln in lines[2:])
    lines = lines[:2]
    assert lines[0].split()[:3] == ["[", "1]", "ingest"] and "success" in lines[0] and lines[0].endswith(" s")
    assert "validate" in lines[1] and "failure" in lines[1]
    assert "executor_input" in log.getvalue() and "executor_input" not in term.getvalue()


def test_the_kfp_ui_gets_html_and_markdown_visualizations(compiled):
    """Each report a person opens is a typed output the KFP UI renders, not a file in a bucket."""
    spec, _ = compiled
    tasks = _tasks(spec)

    def outputs(task: str) -> dict[str, str]:
        comp = spec["components"][tasks[task]["componentRef"]["name"]]
        arts = comp.get("outputDefinitions", {}).get("artifacts", {})
        return {name: a["artifactType"]["schemaTitle"] for name, a in arts.items()}

    assert outputs("validate")["data_docs"] == "system.HTML"  # GX data docs
    assert outputs("loo-report")["markdown"] == "system.Markdown"  # the LOO tables
    assert outputs("loo-report")["page"] == "system.HTML"  # the tables with the chart
    assert outputs("tune-report")["plots"] == "system.HTML"  # interactive Optuna plots
    assert outputs("report")["page"] == "system.HTML"  # the personalization report
    for t in ("ingest", "validate", "loo-report", "tune-report", "train", "register", "report"):
        assert outputs(t).get("metrics") == "system.Metrics", t
