"""Run a TRL training function on Ray Train: `TorchTrainer`, checkpoints in a storage path, a failure policy, resume.

    foveate train grpo --config configs/rl/deepeyes.yaml --ray-workers 2 [--ray-address ADDR]

Each worker runs the same training function (`rl.deepeyes_grpo.train_worker`, `rl.visrl_dpo.train_worker`): Ray
sets up the process group (gloo on CPU, nccl with ``use_gpu``) and HF's Trainer runs distributed data parallel
inside it. Checkpoints: TRL writes ``checkpoint-N`` into the shared output directory on rank 0;
`RankZeroReport` then waits for every rank at a barrier and only rank 0 hands the folder to Ray (the stock
``RayTrainReportCallback`` reports from every rank, and with a shared output directory rank 1 copied a half-written
``config.json``, RESEARCH.md §7). Ray copies it to ``<output_dir>/ray/<name>/``.

Resume: `run` is called again with the same ``RunConfig(name, storage_path)``; a worker asks
``ray.train.get_checkpoint()`` and continues the Trainer from it (optimizer, scheduler, RNG and step count), so
a run killed mid-way ends at the same final step. Within one fit, ``FailureConfig(max_failures)`` restarts the
workers from the last checkpoint after a worker dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from foveate.errors import FoveateError

log = logging.getLogger(__name__)

# A local cluster started with `ray start` has token authentication on: drivers must either carry the token or the
# cluster and drivers must both run with auth disabled (RESEARCH.md §7). We never touch credentials.
TAG_FILE = "foveate_tag.txt"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


class RankZeroReport(TrainerCallback):
    """On every Trainer save: barrier, then rank 0 reports the new checkpoint folder to Ray; others report none.

    ``tag`` (e.g. a stage name) is written into the folder as ``foveate_tag.txt`` so a resumed run of several
    stages continues only the stage the checkpoint belongs to (`resume_checkpoint`).
    """

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback's signature
        import ray.train
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # rank 0 has finished writing checkpoint-N before anyone reports it
        metrics = {"step": state.global_step, **(state.log_history[-1] if state.log_history else {})}
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ray.train.get_context().get_world_rank() == 0 and folder.is_dir():
            (folder / TAG_FILE).write_text(self.tag)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        else:
            ray.train.report(metrics)


@contextlib.contextmanager
def resume_checkpoint(output_dir: str | Path, resume: bool, on_ray: bool, tag: str = "") -> Iterator[str | bool | None]:
    """What to pass as ``Trainer.train(resume_from_checkpoint=…)``: inside Ray, the folder of
    ``ray.train.get_checkpoint()`` (None when Ray has none yet); locally, True with ``resume`` when
    ``output_dir`` holds a ``checkpoint-N`` (the Trainer then picks the last), else None."""
    if on_ray:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            saved = Path(folder) / TAG_FILE
            yield folder if (saved.read_text() if saved.is_file() else "") == tag else None
        return
    yield last_complete_checkpoint(output_dir) if resume else None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The highest ``checkpoint-N`` of ``output_dir`` that was written to the end, or None.

    The Trainer writes ``trainer_state.json`` last, so a folder without it was cut by a kill mid-save: resuming from
    it fails (the Trainer's own ``get_last_checkpoint`` would pick it, being the newest). Such folders are removed —
    they hold nothing a resume can use, and the resumed run writes that step again."""
    complete = None
    for folder in sorted(Path(output_dir).glob("checkpoint-*"), key=_step_of):
        if (folder / "trainer_state.json").is_file():
            complete = folder
        elif _step_of(folder) >= 0:
            log.warning("removing %s: a checkpoint cut short by a kill (no trainer_state.json)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return str(complete) if complete else None


def _step_of(folder: Path) -> int:
    suffix = folder.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else -1


def world_barrier() -> None:
    """Wait for every rank (a no-op outside distributed training)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run(
    train_worker: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    *,
    workers: int,
    output_dir: str | Path,
    address: str | None = None,
    use_gpu: bool = False,
    max_failures: int = 1,
    name: str = "train",
) -> Any:
    """``train_worker(config)`` on ``workers`` Ray Train workers; returns Ray's ``Result``.

    ``address``: an existing cluster (``ray start --head`` printed it); None starts a local one. The storage path
    is ``<output_dir>/ray``: calling `run` again with the same output directory resumes from its last checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if workers < 1:
        raise FoveateError(f"--ray-workers must be at least 1, got {workers}")
    output_dir = Path(output_dir).resolve()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        else:
            # "local": always a fresh instance of our own, never another user's cluster found on this machine
            ray.init(address="local", num_cpus=max(2, workers), include_dashboard=False)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**config, "output_dir": str(output_dir), "on_ray": True},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name,
            storage_path=str(output_dir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors in TrainingFailedError; keep its message, drop the stack
        raise FoveateError(f"Ray Train run failed: {error}") from error
    return result


def train_here_or_on_ray(
    train_worker: Callable[[dict[str, Any]], None], recipe: Any, out: Path, resume: bool, name: str
) -> Path:
    """``train_worker`` with the recipe's settings (a `rl.runs.RunRecipe`) and the run directory ``out``: on
    ``recipe.ray_workers`` Ray Train workers (Ray run ``name``, what a resume finds again), else in this process.
    Returns ``out`` once it holds the trained ``model/``."""
    import dataclasses

    config = {**dataclasses.asdict(recipe), "output_dir": str(out.resolve()), "resume": resume}
    if recipe.ray_workers:
        run(
            train_worker,
            config,
            workers=recipe.ray_workers,
            output_dir=out,
            address=recipe.ray_address,
            use_gpu=recipe.use_gpu,
            max_failures=recipe.max_failures,
            name=name,
        )
    else:
        train_worker(config)
    if not (out / "model" / "config.json").is_file():
        raise FoveateError(f"training ended without a model in {out}")
    return out
