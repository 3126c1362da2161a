"""One thin KFP component per pipeline stage. Each only calls psamf.stages.

All components run in the one psamf image (psamf + kfp installed, so install_kfp_package=False).
Set PSAMF_IMAGE when compiling for a cluster; locally, kfp.local's SubprocessRunner runs them
in this virtualenv. Every input is content-keyed (see psamf.stages), so KFP can cache.
"""
import os
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("PSAMF_IMAGE", "ghcr.io/psamf/psamf:0.1.0")
component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def fingerprint(profile: str, overrides: List[str], params_yaml: str, data_source: str,
                run_name: str) -> NamedTuple("Outputs", data_version=str, fingerprint=str):
    from psamf.stages import fingerprint_stage
    r = fingerprint_stage(profile, overrides, params_yaml, data_source, run_name)
    return (r["data_version"], r["fingerprint"])


@component
def fetch_data(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, data_source: str,
               data_version: str, raw: Output[Dataset]):
    from psamf.stages import fetch_stage
    fetch_stage(profile, overrides, params_yaml, fingerprint, data_source, data_version, raw.path)


@component
def ingest(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, raw: Input[Dataset],
           dataset: Output[Dataset], metrics: Output[Metrics]):
    from psamf.stages import ingest_stage
    ingest_stage(profile, overrides, params_yaml, fingerprint, raw.path, dataset.path, metrics)


@component
def validate(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, dataset: Input[Dataset],
             data_docs: Output[HTML], metrics: Output[Metrics]):
    from psamf.stages import validate_stage
    validate_stage(profile, overrides, params_yaml, fingerprint, dataset.path, data_docs.path, metrics)


@component
def personality(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, raw: Input[Dataset],
                model: Output[Model], metrics: Output[Metrics]):
    from psamf.stages import personality_stage
    personality_stage(profile, overrides, params_yaml, fingerprint, raw.path, model.path, metrics)


@component
def pretrain(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, rank: int,
             dataset: Input[Dataset], model: Output[Model]):
    from psamf.stages import pretrain_stage
    pretrain_stage(profile, overrides, params_yaml, fingerprint, dataset.path, rank, model.path)


@component
def finetune(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, rank: int,
             dataset: Input[Dataset], pretrained: Input[Model], report: Output[Dataset]):
    from psamf.stages import finetune_stage
    finetune_stage(profile, overrides, params_yaml, fingerprint, dataset.path, rank, pretrained.path, report.path)


@component
def loo_report(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, dataset: Input[Dataset],
               reports: Input[List[Dataset]], tables: Output[Artifact], markdown: Output[Markdown],
               page: Output[HTML], metrics: Output[Metrics]):
    from psamf.stages import loo_report_stage
    loo_report_stage(profile, overrides, params_yaml, fingerprint, dataset.path, [r.path for r in reports],
                     tables.path, markdown.path, metrics, page.path)


@component
def tune_worker(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, rank: int,
                dataset: Input[Dataset], personality_model: Input[Model], trials: Output[Artifact]):
    from psamf.stages import tune_worker_stage
    tune_worker_stage(profile, overrides, params_yaml, fingerprint, dataset.path, personality_model.path, rank,
                      trials.path)


@component
def tune_report(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, dataset: Input[Dataset],
                personality_model: Input[Model], workers: Input[List[Artifact]], best_params: Output[Artifact],
                plots: Output[HTML], metrics: Output[Metrics]):
    from psamf.stages import tune_report_stage
    tune_report_stage(profile, overrides, params_yaml, fingerprint, dataset.path, personality_model.path,
                      best_params.path, metrics, plots.path)


@component
def train(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, dataset: Input[Dataset],
          personality_model: Input[Model], best_params: Input[Artifact], model: Output[Model],
          metrics: Output[Metrics]):
    from psamf.stages import train_stage
    train_stage(profile, overrides, params_yaml, fingerprint, dataset.path, personality_model.path,
                best_params.path, model.path, metrics)


@component
def register(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, dataset: Input[Dataset],
             personality_model: Input[Model], model: Input[Model], metrics: Output[Metrics]):
    from psamf.stages import register_stage
    register_stage(profile, overrides, params_yaml, fingerprint, dataset.path, personality_model.path, model.path,
                   metrics)


@component
def report(profile: str, overrides: List[str], params_yaml: str, fingerprint: str, dataset: Input[Dataset],
           loo_tables: Input[Artifact], model: Input[Model], page: Output[HTML], files: Output[Artifact],
           metrics: Output[Metrics]):
    from psamf.stages import report_stage
    report_stage(profile, overrides, params_yaml, fingerprint, dataset.path, loo_tables.path, model.path,
                 page.path, files.path, metrics)
