"""Stage 4 assets: `checkpoint_phase1` (projector) then `checkpoint_phase2` (projector + LLM).

Each asset starts the training process (`accelerate launch`, the same command as the CLI and DVC) through
Dagster Pipes: the launched main process streams its log lines and metrics records to the run and reports
the materialisation metadata (summary numbers, the loss curve). The model and the loop live in that
process, never in the asset. Before it starts, the launch is checked here (devices, the memory plan: a launch that
cannot run is refused, naming its accelerate config) and the plan joins the metadata. With `launcher: slurm` the
phase runs as a SLURM job (`sbatch --wait`) in a Pipes session whose messages travel through a file on the shared
filesystem; terminating the run cancels the job (scancel). The assets run in the concurrency pool `gpu` (set its
limit to the number of training jobs the machine can hold, e.g. `dagster instance concurrency set gpu 1`).
"""

import json

import dagster as dg

from llava_core.artifacts import LOSS_PLOT, METRICS, TRAIN_SUMMARY
from llava_core.config import PipelineConfig
from llava_core.pipeline import asset_inputs, stage
from llava_core.stage_guard import guarded
from llava_core.training.launch import finished, launch_command, launch_env, preflight
from llava_core.training.memory import GIB, plan_for

TRAIN_POOL = "gpu"
STAGE = stage("train")


def checkpoint_key(phase: str) -> dg.AssetKey:
    return dg.AssetKey(STAGE.asset_name(phase))


def run_on_slurm(context: dg.AssetExecutionContext, cfg: PipelineConfig, phase: str):
    """The phase as a SLURM job inside a Pipes session: (what the job reported, its custom messages)."""
    from llava_core.training.slurm import SlurmJob, job_dir

    job = SlurmJob(cfg, phase)
    job_dir(cfg).mkdir(parents=True, exist_ok=True)
    messages = job_dir(cfg).resolve() / f"{phase}.pipes.jsonl"  # on the shared filesystem, like the workspace
    reader = dg.PipesFileMessageReader(str(messages))
    with dg.open_pipes_session(context, dg.PipesEnvContextInjector(), reader) as session:
        try:
            job.submit(session.get_bootstrap_env_vars())
            context.log.info(f"[slurm] {phase}: job {job.job_id} submitted ({job.script_path})")
            # the job's log, less the training's own lines: those arrive through Pipes
            status = job.wait(lambda line: None if line.startswith(f"[{phase}] ") else context.log.info(line))
        except BaseException:  # the run was terminated (or failed here): the job must not run on
            job.cancel()
            context.log.warning(f"[slurm] {phase}: job {job.job_id} cancelled")
            raise
        if status != 0:
            raise dg.Failure(
                f"SLURM job {job.job_id} ({phase}) failed (sbatch --wait exit {status}); log {job.log_path}"
            )
    results = [r for r in session.get_results() if isinstance(r, dg.MaterializeResult)]
    return (results[-1] if results else dg.MaterializeResult()), session.get_custom_messages()


def build_train_assets(cfg: PipelineConfig) -> list[dg.AssetsDefinition]:
    def make(phase: str) -> dg.AssetsDefinition:
        name = STAGE.asset_name(phase)

        @dg.asset(
            key=name,
            deps=asset_inputs(cfg, STAGE, phase),
            group_name="train",
            kinds={"pytorch"},
            pool=TRAIN_POOL,
            required_resource_keys={"settings"},
            description=f"Trained {phase} checkpoint in checkpoints/{phase}/ (resumes a killed run of the same config).",
        )
        def _ckpt(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            settings = context.resources.settings
            c = settings.load()
            # the checkpoint's lock, as `llava-pipeline train` takes it: one training of this phase at a time
            # a run that waited for the pool (another run training this phase) counts as having waited for the lock
            run = context.instance.get_run_record_by_id(context.run.run_id)
            started = run.start_time if run else None
            with guarded(c, STAGE, phase, context.log.info, since=started) as guard:
                if guard.current is not None:  # another run trained it from the same inputs while this one waited
                    return settings.record_version(name, dg.MaterializeResult(metadata=recorded_metadata(c, phase)))
                if c.train[phase].launcher == "slurm":
                    plan = plan_for(c, phase)  # the job's machines check themselves when it starts
                    reported, custom = run_on_slurm(context, c, phase)
                else:
                    plan = preflight(c, phase)  # refuses what cannot run here, before the process starts
                    invocation = dg.PipesSubprocessClient().run(
                        context=context, command=launch_command(c, phase), env=launch_env()
                    )
                    custom = invocation.get_custom_messages()
                    reported = invocation.get_materialize_result()  # what the training process reported (Pipes)
                context.log.info(plan.render())
                # the summary must be there (a complete checkpoint); removes the launch spec
                guard.done(finished(c, phase))
                metadata = {
                    **reported.metadata,
                    "pipes_metrics_records": len(custom),
                    "memory_plan": dg.MetadataValue.md(f"```\n{plan.render()}\n```"),
                    "memory_plan_gib_per_process": round(plan.total / GIB, 3),
                }
                return settings.record_version(name, dg.MaterializeResult(metadata=metadata))

        return _ckpt

    return [make(p) for p in STAGE.keys(cfg)]


def recorded_metadata(cfg: PipelineConfig, phase: str) -> dict:
    """The metadata the training process reports, read back from a finished checkpoint (one this run did not train)."""
    from llava_core.training.observe import read_metrics, summary_metadata

    folder = cfg.checkpoint_dir(phase)
    picture = folder / LOSS_PLOT
    png = picture.read_bytes() if picture.is_file() else None
    summary = json.loads((folder / TRAIN_SUMMARY).read_text())
    meta = summary_metadata(summary, read_metrics(folder / METRICS), folder, png)
    kinds = {"path": dg.MetadataValue.path, "md": dg.MetadataValue.md}
    return {k: kinds[v["type"]](v["raw_value"]) if isinstance(v, dict) else v for k, v in meta.items()} | {
        "trained_by": "another run (this one waited for its lock)"
    }
