"""``foveate caption INPUT --out OUT``: the command line face of `foveate.jobs.caption`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from foveate.errors import FoveateError
from foveate.jobs.caption import DEFAULT_PROMPT, CaptionSpec
from foveate.jobs.job import JobSummary, run_caption_job

err = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Images per second over the whole run so far (model loading included: what the job really does)."""

    def render(self, task) -> Text:
        elapsed = task.finished_time or task.elapsed
        return Text(f"{task.completed / elapsed:.2f} img/s" if elapsed and task.completed else "– img/s")


class EtaColumn(ProgressColumn):
    """Time left at the run's average rate (steadier than rich's windowed speed when batches land together)."""

    def render(self, task) -> Text:
        elapsed = task.finished_time or task.elapsed
        if task.total is None or not task.completed or not elapsed:
            return Text("ETA –")
        left = (task.total - task.completed) * elapsed / task.completed
        return Text(f"ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")


def resolved_config(model: str | None, endpoint: str | None):
    """The config with the backend fixed on the driver (workers get absolute paths, never defaults of their own)."""
    from foveate.api import default_model_path
    from foveate.config import load_config

    config = load_config()
    endpoint = endpoint or config.endpoint
    overrides = {"home": str(config.home_dir.resolve())}
    if endpoint:
        if not (model or config.endpoint_model):
            raise FoveateError("--endpoint needs --model NAME (the model name the server serves)")
        overrides.update(endpoint=endpoint, endpoint_model=model or config.endpoint_model)
    else:
        chosen = model or config.model or str(default_model_path(config))
        if Path(chosen).expanduser().exists():
            chosen = str(Path(chosen).expanduser().resolve())
        elif model and ("/" not in model or model.startswith((".", "/", "~"))):
            raise FoveateError(f"model not found: {model} (a model directory or a cached Hub id)")
        overrides["model"] = chosen
    return config.with_overrides(**overrides)


def caption_command(
    input: str = typer.Argument(..., help="a folder, a glob ('imgs/*.jpg'), a tasks.jsonl or a .parquet file"),
    out: Path = typer.Option(..., "--out", help="output: a .jsonl file, or a directory for --format parquet"),
    strategy: str = typer.Option(None, "--strategy", "-s", help="strategy name (default from config: direct)"),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="what the strategy is asked about every image"),
    workers: int = typer.Option(1, "--workers", "-w", help="model workers; above 1 the job runs on Ray Data"),
    ray_address: str = typer.Option(None, "--ray-address", help="join this Ray cluster (HOST:PORT or 'auto')"),
    ray: bool = typer.Option(False, "--ray", help="use Ray Data even with one worker and no --ray-address"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="images per batch (model calls batch across them)"),
    fmt: str = typer.Option(None, "--format", help="jsonl or parquet (default: parquet if --out ends in .parquet)"),
    model: str = typer.Option(None, "--model", "-m", help="model directory or Hub id; with --endpoint: model name"),
    endpoint: str = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="caption length cap per model call"),
    option: list[str] = typer.Option(None, "--option", "-o", help="strategy build option KEY=VALUE (repeatable)"),
    limit: int = typer.Option(None, "--limit", help="caption only the first N inputs"),
    threads: int = typer.Option(
        None, "--threads", help="torch threads per worker (default: torch's own locally, 1 per Ray actor)"
    ),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="caption again the ids that have error rows"),
) -> None:
    """Caption many images with any strategy; resumable (a rerun with the same --out does only what is missing)."""
    from foveate.agents import get_builder
    from foveate.config import parse_options
    from foveate.jobs.sinks import make_sink
    from foveate.jobs.sources import resolve_source

    config = resolved_config(model, endpoint)
    strategy = strategy or config.strategy
    options = {**config.options_for(strategy), **parse_options(option)}
    get_builder(strategy, options)()  # unknown strategies or options fail before any work
    source = resolve_source(input).limited(limit)
    sink = make_sink(out, fmt)
    spec = CaptionSpec(
        strategy=strategy,
        prompt=prompt,
        options=options,
        config=config,
        max_new_tokens=max_new_tokens or config.max_new_tokens,
        threads=threads,
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        EtaColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("captioning", total=None)

        def progress(advance: int, summary: JobSummary) -> None:
            if bar.tasks[task].total is None:
                bar.update(task, total=summary.total - summary.skipped, description=f"captioning [{summary.mode}]")
            bar.advance(task, advance)

        summary = run_caption_job(
            source,
            sink,
            spec,
            workers=workers,
            batch_size=batch_size,
            ray_address=ray_address,
            use_ray=True if ray else None,
            retry_errors=retry_errors,
            progress=progress,
        )
    new = f"{summary.done} new ({summary.errors} error rows)" if summary.done else "nothing new"
    rate = f" in {summary.seconds:.1f} s, {summary.images_per_s:.2f} images/s" if summary.done else ""
    typer.echo(f"{new}{rate}; {summary.skipped} of {summary.total} were already in {out} [{summary.mode}]")
