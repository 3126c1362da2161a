"""The psamf training pipeline: one DAG for kfp.local and for a Kubeflow cluster.

    decide -> [if 'run'] start_run -> ingest -> validate (a failure stops the run)
        |-> personality
        |-> ParallelFor(rank slots): pretrain -> finetune   -> loo_report (Collected)
        `-> tune (needs personality) -> train
    register (after train and loo_report)

Parameters mirror params.yaml: `profile` picks the profile and `overrides` takes any
`section.key=value`, exactly like `psamf --profile ... --set ...`; `loo_ranks` are the LOO
user slots (0 = the speaker with the most segments; slots beyond data.loo_users finish at once).
`force=False` (scheduled runs) skips everything after `decide` when neither the data hash nor
the code changed since the last completed run; the skip is recorded in MLflow.
"""
from typing import List

from kfp import dsl, kubernetes

from components import stages

# Training stages ask for a GPU on a cluster; kfp.local ignores these settings.
GPU_STAGES = ("personality", "pretrain", "finetune", "tune", "train")
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
# Kubernetes secrets (infra/k8s/secrets) -> env vars, per task.
SECRETS = {
    "psamf-mlflow": {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"},
    "psamf-s3": {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")},
    "psamf-postgres": {"PSAMF_OPTUNA_STORAGE": "PSAMF_OPTUNA_STORAGE"},
}
LOO_PARALLELISM = 4


def configure(task: dsl.PipelineTask, stage: str, *, cpu: str = "2", memory: str = "8G",
              secrets: tuple[str, ...] = ("psamf-mlflow", "psamf-s3")) -> dsl.PipelineTask:
    """Resources, retries, caching and secrets for one task."""
    task.set_cpu_limit(cpu).set_memory_limit(memory).set_retry(2).set_caching_options(True)
    task.set_display_name(stage)
    if stage in GPU_STAGES:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_node_selector(task, *GPU_NODE_SELECTOR)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    for name in secrets:
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=SECRETS[name])
    return task


# A nested pipeline, so that inside the ParallelFor `parent_run_id` is an input of the enclosing
# DAG. kfp.local (2.17) replaces every *task-output* parameter of a loop iteration with the loop
# item, so passing start_run's output straight into the loop would hand pretrain the rank instead.
@dsl.pipeline(name="psamf-train-and-register")
def train_and_register(profile: str, overrides: List[str], loo_ranks: List[int], parent_run_id: str) -> None:
    common = {"profile": profile, "overrides": overrides}
    data = configure(stages.ingest(parent_run_id=parent_run_id, **common), "ingest", memory="4G")
    dataset = data.outputs["dataset"]
    checked = configure(stages.validate(parent_run_id=parent_run_id, dataset=dataset, **common), "validate", memory="4G")

    pers = configure(stages.personality(parent_run_id=parent_run_id, dataset=dataset, **common), "personality")
    pers.after(checked)

    with dsl.ParallelFor(loo_ranks, parallelism=LOO_PARALLELISM) as rank:
        pre = configure(stages.pretrain(parent_run_id=parent_run_id, rank=rank, dataset=dataset, **common), "pretrain")
        pre.after(checked)
        fin = configure(stages.finetune(parent_run_id=parent_run_id, rank=rank, dataset=dataset,
                                        pretrained=pre.outputs["model"], **common), "finetune")
    report = configure(stages.loo_report(parent_run_id=parent_run_id, dataset=dataset,
                                         reports=dsl.Collected(fin.outputs["report"]), **common),
                       "loo_report", memory="4G")

    search = configure(stages.tune(parent_run_id=parent_run_id, dataset=dataset, personality_model=pers.outputs["model"],
                                   **common), "tune", secrets=("psamf-mlflow", "psamf-s3", "psamf-postgres"))
    trained = configure(stages.train(parent_run_id=parent_run_id, dataset=dataset, personality_model=pers.outputs["model"],
                                     best_params=search.outputs["best_params"], **common), "train")
    gate = configure(stages.register(parent_run_id=parent_run_id, dataset=dataset, personality_model=pers.outputs["model"],
                                     model=trained.outputs["model"], **common), "register", memory="4G")
    gate.after(report)


@dsl.pipeline(name="psamf-training", description="Personalized MulT LOO + PSA-MF search/train + registry gate")
def training(profile: str = "demo", overrides: List[str] = [],  # noqa: B006 - KFP parameter default
             loo_ranks: List[int] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], run_name: str = "kfp",  # noqa: B006
             force: bool = True) -> None:
    common = {"profile": profile, "overrides": overrides}
    # The condition reads decide's single output: kfp.local resolves a task's `Output` in a
    # dsl.If, but not a named NamedTuple field (it then skips the branch as if it were false).
    decision = configure(stages.decide(name=run_name, force=force, **common), "decide", cpu="1", memory="2G",
                         secrets=("psamf-mlflow",))
    decision.set_caching_options(False)  # the skip decision must be made fresh every time
    with dsl.If(decision.output == "run", name="data-or-code-changed"):
        run = configure(stages.start_run(name=run_name, **common), "start_run", cpu="1", memory="2G",
                        secrets=("psamf-mlflow",))
        run.set_caching_options(False)  # a new parent run for every pipeline run
        train_and_register(loo_ranks=loo_ranks, parent_run_id=run.output, **common)
