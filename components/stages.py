"""One thin KFP component per pipeline stage. Each only calls psamf.orchestration.

All components run in the one psamf image (psamf + kfp installed, so install_kfp_package=False).
Set PSAMF_IMAGE when compiling for a cluster; locally, kfp.local's SubprocessRunner runs them
in this virtualenv.
"""
import os
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("PSAMF_IMAGE", "ghcr.io/psamf/psamf:0.1.0")
component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def decide(profile: str, overrides: List[str], name: str, force: bool) -> str:
    from psamf.orchestration import retrain_decision
    return retrain_decision(profile, overrides, name, force)


@component
def start_run(profile: str, overrides: List[str], name: str) -> str:
    from psamf.orchestration import start_pipeline_run
    return start_pipeline_run(profile, overrides, name)


@component
def ingest(profile: str, overrides: List[str], parent_run_id: str, dataset: Output[Dataset],
           metrics: Output[Metrics]):
    from psamf.orchestration import ingest_stage
    ingest_stage(profile, overrides, dataset.path, parent_run_id, metrics)


@component
def validate(profile: str, overrides: List[str], parent_run_id: str, dataset: Input[Dataset],
             data_docs: Output[HTML], metrics: Output[Metrics]):
    from psamf.orchestration import validate_stage
    validate_stage(profile, overrides, dataset.path, data_docs.path, parent_run_id, metrics)


@component
def personality(profile: str, overrides: List[str], parent_run_id: str, dataset: Input[Dataset],
                model: Output[Model], metrics: Output[Metrics]):
    from psamf.orchestration import personality_stage
    personality_stage(profile, overrides, dataset.path, model.path, parent_run_id, metrics)


@component
def pretrain(profile: str, overrides: List[str], parent_run_id: str, rank: int, dataset: Input[Dataset],
             model: Output[Model]):
    from psamf.orchestration import pretrain_stage
    pretrain_stage(profile, overrides, dataset.path, rank, model.path, parent_run_id)


@component
def finetune(profile: str, overrides: List[str], parent_run_id: str, rank: int, dataset: Input[Dataset],
             pretrained: Input[Model], report: Output[Dataset]):
    from psamf.orchestration import finetune_stage
    finetune_stage(profile, overrides, dataset.path, rank, pretrained.path, report.path, parent_run_id)


@component
def loo_report(profile: str, overrides: List[str], parent_run_id: str, dataset: Input[Dataset],
               reports: Input[List[Dataset]], tables: Output[Artifact], markdown: Output[Markdown],
               metrics: Output[Metrics]):
    from psamf.orchestration import loo_report_stage
    loo_report_stage(profile, overrides, dataset.path, [r.path for r in reports], tables.path, markdown.path,
                     parent_run_id, metrics)


@component
def tune(profile: str, overrides: List[str], parent_run_id: str, dataset: Input[Dataset],
         personality_model: Input[Model], best_params: Output[Artifact], metrics: Output[Metrics]):
    from psamf.orchestration import tune_stage
    tune_stage(profile, overrides, dataset.path, personality_model.path, best_params.path, parent_run_id, metrics)


@component
def train(profile: str, overrides: List[str], parent_run_id: str, dataset: Input[Dataset],
          personality_model: Input[Model], best_params: Input[Artifact], model: Output[Model],
          metrics: Output[Metrics]):
    from psamf.orchestration import train_stage
    train_stage(profile, overrides, dataset.path, personality_model.path, best_params.path, model.path,
                parent_run_id, metrics)


@component
def register(profile: str, overrides: List[str], parent_run_id: str, dataset: Input[Dataset],
             personality_model: Input[Model], model: Input[Model], metrics: Output[Metrics]):
    from psamf.orchestration import register_stage
    register_stage(profile, overrides, dataset.path, personality_model.path, model.path, parent_run_id, metrics)
