"""The psamf training pipeline: one DAG for kfp.local and for a Kubeflow cluster.

    fingerprint (never cached) -> fetch_data -> ingest -> validate (a failure stops the run)
        |-> personality
        |-> ParallelFor(loo_ranks): pretrain -> finetune      -> loo_report (Collected)
        `-> ParallelFor(tune_workers): tune_worker -> tune_report -> train
    register (after train and loo_report) -> report (every model per LOO user; the last task)

Parameters: `profile`, `overrides` (`section.key=value`) and `params_yaml` (the text of a
params file; '' = the image's params.yaml) reach every task, exactly like `psamf --params
--profile --set`. `data_source` names the corpus (psamf.data.source): `synthetic`, `dvc`,
`dvc:<md5>[@<remote>]` or `s3://bucket/prefix`. `loo_ranks` are LOO user slots (0 = the
speaker with the most segments; default: one per data.loo_users; slots beyond it finish at
once); `tune_workers` are the Optuna worker ranks, one pod (and GPU) each, sharing one
PostgreSQL study.

Skipping unchanged work is KFP's cache, not a step of ours. `fingerprint` is the only task
that always runs: it reads the data version from the source without downloading it and hashes
it with the image's code version and the params. Every other task takes that fingerprint and
artifacts of cached tasks as inputs, so a scheduled run on unchanged code, data and params is
served from the cache task by task, and a change in any of the three misses it everywhere
downstream. The MLflow parent run is found or created from the fingerprint.
"""
from typing import List

from kfp import dsl, kubernetes

from components import stages
from psamf.config import loo_rank_slots

# Only these request a GPU on a cluster (kfp.local ignores resources): the few full-batch
# finetune steps, the encoder fine-tuning of `personality` and the data stages do not need one.
GPU_STAGES = ("pretrain", "tune-worker", "train")
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
# Kubernetes secrets (infra/k8s/secrets) -> env vars. Each task mounts only the ones it uses.
SECRETS = {
    "psamf-mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "psamf-s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "PSAMF_CHECKPOINT_URI"),
    "psamf-optuna": ("PSAMF_OPTUNA_STORAGE",),
}
TRACKED = ("psamf-mlflow",)
CHECKPOINTED = ("psamf-mlflow", "psamf-s3")  # durable checkpoints in S3 (psamf.checkpoints)
TUNE = ("psamf-mlflow", "psamf-optuna")
# One ReadWriteMany volume of encoder weights, so no pod downloads a model twice.
HF_CACHE_PVC, HF_CACHE_MOUNT = "psamf-hf-cache", "/cache/huggingface"
ENCODER_STAGES = ("ingest", "personality", "tune-worker", "tune-report", "train", "register")
LOO_PARALLELISM = 4


def configure(task: dsl.PipelineTask, stage: str, *, cpu: str = "2", memory: str = "8G",
              secrets: tuple[str, ...] = TRACKED, cache: bool = True) -> dsl.PipelineTask:
    """Resources, retries, caching, secrets and volumes for one task."""
    task.set_cpu_limit(cpu).set_memory_limit(memory).set_retry(2).set_caching_options(cache)
    task.set_display_name(stage)
    if stage in GPU_STAGES:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if stage in ENCODER_STAGES:
        kubernetes.mount_pvc(task, pvc_name=HF_CACHE_PVC, mount_path=HF_CACHE_MOUNT)
        task.set_env_variable("HF_HOME", HF_CACHE_MOUNT)
    for name in secrets:
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env={k: k for k in SECRETS[name]})
    return task


# A nested pipeline, so that inside the ParallelFor loops `fingerprint` is an input of the
# enclosing DAG. kfp.local (2.17) replaces every *task-output* parameter of a loop iteration
# with the loop item, so passing the fingerprint task's output straight into a loop would hand
# pretrain the rank instead.
@dsl.pipeline(name="psamf-train-and-register")
def train_and_register(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, data_source: str,
                       data_version: str, loo_ranks: List[int], tune_workers: List[int]) -> None:
    common = {"profile": profile, "overrides": overrides, "params_yaml": params_yaml, "fingerprint": fingerprint}
    raw = configure(stages.fetch_data(data_source=data_source, data_version=data_version, **common),
                    "fetch-data", cpu="1", memory="4G", secrets=("psamf-s3",)).outputs["raw"]
    data = configure(stages.ingest(raw=raw, **common), "ingest", memory="4G")
    dataset = data.outputs["dataset"]
    checked = configure(stages.validate(dataset=dataset, **common), "validate", cpu="1", memory="4G")

    pers = configure(stages.personality(raw=raw, **common), "personality", secrets=CHECKPOINTED)
    pers.after(checked)

    with dsl.ParallelFor(loo_ranks, parallelism=LOO_PARALLELISM) as rank:
        pre = configure(stages.pretrain(rank=rank, dataset=dataset, **common), "pretrain", secrets=CHECKPOINTED)
        pre.after(checked)
        fin = configure(stages.finetune(rank=rank, dataset=dataset, pretrained=pre.outputs["model"], **common),
                        "finetune")
    report = configure(stages.loo_report(dataset=dataset, reports=dsl.Collected(fin.outputs["report"]), **common),
                       "loo-report", cpu="1", memory="4G")

    personality_model = pers.outputs["model"]
    with dsl.ParallelFor(tune_workers) as worker:
        trials = configure(stages.tune_worker(rank=worker, dataset=dataset, personality_model=personality_model,
                                              **common), "tune-worker", secrets=(*TUNE, "psamf-s3"))
    search = configure(stages.tune_report(dataset=dataset, personality_model=personality_model,
                                          workers=dsl.Collected(trials.outputs["trials"]), **common),
                       "tune-report", cpu="1", memory="4G", secrets=TUNE)
    trained = configure(stages.train(dataset=dataset, personality_model=personality_model,
                                     best_params=search.outputs["best_params"], **common), "train",
                        secrets=CHECKPOINTED)
    gate = configure(stages.register(dataset=dataset, personality_model=personality_model,
                                     model=trained.outputs["model"], **common), "register", memory="4G")
    # The gate's lock lives in a database: the tracking server hides its own, so use Optuna's PostgreSQL.
    kubernetes.use_secret_as_env(gate, secret_name="psamf-optuna",
                                 secret_key_to_env={"PSAMF_OPTUNA_STORAGE": "PSAMF_REGISTRY_LOCK_URL"})
    gate.after(report)
    # Last: the run's one page (every model per LOO user); it marks the MLflow parent run completed.
    configure(stages.report(dataset=dataset, loo_tables=report.outputs["tables"], model=trained.outputs["model"],
                            **common), "report", cpu="1", memory="4G").after(gate)


@dsl.pipeline(name="psamf-training", description="Personalized MulT LOO + PSA-MF search/train + registry gate")
def training(profile: str = "demo", overrides: List[str] = [],  # noqa: B006 - KFP parameter default
             params_yaml: str = "", data_source: str = "synthetic",
             loo_ranks: List[int] = loo_rank_slots(),  # noqa: B006,B008 - data.loo_users at compile time
             tune_workers: List[int] = [0], run_name: str = "kfp") -> None:  # noqa: B006
    common = {"profile": profile, "overrides": overrides, "params_yaml": params_yaml}
    fp = configure(stages.fingerprint(data_source=data_source, run_name=run_name, **common), "fingerprint",
                   cpu="1", memory="2G", secrets=("psamf-mlflow", "psamf-s3"), cache=False)
    train_and_register(fingerprint=fp.outputs["fingerprint"], data_source=data_source,
                       data_version=fp.outputs["data_version"], loo_ranks=loo_ranks, tune_workers=tune_workers,
                       **common)
