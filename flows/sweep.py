"""The `sweep` deployments of the `vit-pipeline` flow: a hyperparameter search over one model.

    shard (cached, the pipeline's own task) -> verify -> sweep: Ray Tune trials of the pipeline's Ray Train
    training, ASHA stopping the ones behind -> results.json, best.yaml, the ranked trials as an artifact

Like the pipeline, each flow run writes its own directory, runs/<run>/<flow run>/, and its W&B runs form one
group of that name: a run per trial (job type sweep-trial) and the sweep's summary. A flow run that died is
continued by the next sweep of the same configuration: its directory, and Tune's experiment in it, are
restored; finished trials are not run again. The flow's result is the best configuration.

Ray Tune drives its trials from a driver on the cluster: from this process when it is on a node of the
cluster ("auto", <head>:6379, or a local Ray), else, where the cluster is reached through its Jobs API
(http://<head>:8265, as from an off-cluster Prefect worker or KubeRay), as one Ray Job followed from here,
as the pipeline's trainings are (tasks/operations/ray_jobs.py). With orchestration.cluster.launcher set, the
cluster is brought up for the sweep and down after it, as for the pipeline (tasks/operations/cluster.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import (
    FLOW_NAME,
    MAX_TASK_THREADS,
    _links,
    _result_storage,
    _retry_transient,
    shard_task,
    verify_task,
)
from flows.run_owner import claim_run_directory, finish_run_directory
from tasks.config import PipelineConfig, load_config
from tasks.operations.cluster import cluster_for_run, launcher_for
from tasks.operations.ray_jobs import jobs_api, jobs_stopped_on_exit, sweep_as_job
from tasks.operations.tracking import require_wandb_key, sync_command

if TYPE_CHECKING:
    from tasks.operations.sweep import SweepOutcome

DEFAULT_SWEEP_CONFIG_FILE = "configs/sweep-smoke.yaml"
SWEEP_KIND = "sweep"  # its run directories are continued only by sweeps, never by the pipeline


@task(name="sweep", retry_condition_fn=_retry_transient)
def sweep_task(config: PipelineConfig, group: str) -> SweepOutcome:
    """Ray Tune over the sweep's space, here or as a Ray Job; a retry restores the experiment instead of
    starting it again."""
    from tasks.operations.sweep import markdown_table, run_sweep  # Ray and torch: only where the sweep runs

    address = jobs_api(config)
    if address:
        outcome = sweep_as_job(address, config, group=group, flow_run_id=str(flow_run.get_id()),
                               emit=get_run_logger().info)
    else:
        outcome = run_sweep(config, group=group)
    sweep = config.sweep
    create_markdown_artifact(
        key="sweep-trials",
        markdown=f"# Sweep of {sweep.model} on {sweep.metric} ({sweep.direction})\n\n"
                 + markdown_table(outcome.trials, sweep, config.training.epochs)
                 + f"\nBest configuration: `{outcome.best_config_file.absolute()}`\n",
        description=f"The sweep's trials, best {sweep.metric} first",
    )
    return outcome


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS))
def vit_sweep(
    config: PipelineConfig | None = None,
    config_file: str = DEFAULT_SWEEP_CONFIG_FILE,
    overrides: list[str] | None = None,
) -> PipelineConfig:
    """Shard, verify, then search the config's sweep section with Ray Tune; returns the best configuration
    (also written as best.yaml beside results.json in the flow run's sweep/ directory).

    `config` (the form in the Prefect UI) wins; otherwise `config_file` plus `section.field=value` overrides.
    """
    from tasks.operations.sweep import require_sweep
    from tasks.training.train import ensure_ray

    logger = get_run_logger()
    source = "the flow's config" if config is not None else config_file
    config = config or load_config(config_file, overrides or [])
    require_sweep(config, source)
    require_wandb_key(config)  # online W&B without a key fails here, not in the first trial
    options = config.orchestration
    claim = claim_run_directory(config, str(flow_run.get_id()), flow_run.get_name(), kind=SWEEP_KIND)
    config = claim.config
    for crashed in claim.crashed:
        logger.warning("flow run %s of %s had died without a final state: marked Crashed", crashed,
                       config.run_root)
    if claim.continued:
        logger.warning("continuing %s, left unfinished by flow run %s: its sweep resumes where it stopped",
                       config.run_dir, claim.continued)
    group = config.tracking.flow_run
    limits = dict(retries=options.retries, retry_delay_seconds=options.retry_delay_seconds)
    shard_limits = dict(timeout_seconds=options.shard_timeout_minutes * 60, **limits)
    shard_task.with_options(result_storage=_result_storage(config), **shard_limits)(config, group)
    verify_task.with_options(**shard_limits)(config)

    with cluster_for_run(config, launcher_for(options.cluster), emit=logger.info) as on_cluster:
        address = jobs_api(on_cluster)
        _links(on_cluster, address or ensure_ray(on_cluster))
        with jobs_stopped_on_exit(address, str(flow_run.get_id())):
            outcome = sweep_task.with_options(**limits)(on_cluster, group)
    finish_run_directory(config)
    best = outcome.trials[0]
    logger.info("best of %d trials: %s, %s %.4f at epoch %d, with %s", len(outcome.trials), best.trial,
                config.sweep.metric, best.best_value, best.best_epoch, best.parameters)
    logger.info("results: %s; best configuration: %s", Path(outcome.results_file).absolute(),
                Path(outcome.best_config_file).absolute())
    logger.info("W&B runs are offline unless tracking.mode is online with WANDB_API_KEY set; upload with: %s",
                sync_command(config))
    return outcome.best_config
