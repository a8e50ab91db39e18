"""``foveate eval``: run strategies on a benchmark and print one table per question family and split.

    foveate eval --task world:small-detail --strategies direct,oracle-crop --n 200 --out results.json
    foveate eval --task exports/textvqa/tasks.jsonl --strategies direct --endpoint http://localhost:8000/v1 \\
                 --model Qwen/Qwen2.5-VL-7B-Instruct --out textvqa.json
    foveate eval --task vstar:/data/vstar_bench --strategies direct,vicrop-rel
    foveate eval --task pope:/data/coco_pope_adversarial.json --images /data/coco/val2014

``--task world:<preset>`` generates the held-out set once (eval seed 1000 unless ``--seed``; training uses other
seeds) and caches it under ``$FOVEATE_HOME/tasks/``. Finished items are appended to ``<out stem>.items.jsonl``
(``results.json`` → ``results.items.jsonl``; without ``--out``, a cache file under ``$FOVEATE_HOME/eval/``), and a
rerun skips them: an interrupted evaluation resumes where it stopped. The main CLI mounts `eval_command` with
``app.command("eval")``; this module imports only typer and rich until the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from foveate.errors import FoveateError

__all__ = ["eval_command"]


def eval_command(
    task: str = typer.Option(
        ...,
        "--task",
        "-t",
        help="world:<preset>[@train|@heldout] (e.g. world:small-detail; @pool rewords its questions), vstar:DIR, "
        "pope:FILE, textvqa:FILE or a tasks.jsonl path",
    ),
    images: str = typer.Option(None, "--images", help="image folder for pope:/textvqa: (COCO val2014, TextVQA)"),
    strategies: str = typer.Option("direct", "--strategies", "-s", help="comma-separated strategy names"),
    n: int = typer.Option(None, "--n", help="number of items (world: questions generated, default 200; file: first N)"),
    model: str = typer.Option(None, "--model", "-m", help="model directory or Hub id; with --endpoint: model name"),
    endpoint: str = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"),
    out: Path = typer.Option(
        None, "--out", "-o", help="results JSON; finished items go to <stem>.items.jsonl beside it"
    ),
    seed: int = typer.Option(None, "--seed", help="world seed (default 1000, held out from training seeds)"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="answer length cap per model call"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="most conversations merged into one model call"),
    concurrency: int = typer.Option(16, "--concurrency", min=1, help="items run at the same time"),
    wisdom_model: str = typer.Option(None, "--wisdom-model", help="LLM of text-only roles (proreason, vpd)"),
    wisdom_endpoint: str = typer.Option(None, "--wisdom-endpoint", help="OpenAI-compatible URL of that LLM"),
) -> None:
    """Evaluate strategies on a task set: accuracy, POPE, grounding, model calls, tokens and latency."""
    from foveate.agents import get_builder
    from foveate.api import make_policy, make_wisdom_policy
    from foveate.config import load_config
    from foveate.eval.report import aggregate, print_run_times, print_tables, results_json, write_results
    from foveate.eval.runner import default_items_path, items_path_for, model_identity, resolve_tasks, run_eval
    from foveate.tools.store import ImageStore

    err = Console(stderr=True, soft_wrap=True)
    config = load_config()
    names = list(dict.fromkeys(s.strip() for s in strategies.split(",") if s.strip()))
    if not names:
        raise FoveateError("--strategies is empty; name at least one strategy")
    options = {name: config.options_for(name) for name in names}  # the config's strategy_options
    for name in names:
        get_builder(name, options[name])  # unknown strategies/options fail before any data or model loads
    tasks = resolve_tasks(task, n=n, seed=seed, home=config.home_dir, images=images)
    if not tasks.rows:
        raise FoveateError(f"no task rows in {tasks.path}")
    policy = make_policy(model, endpoint, config=config)
    model_id = model_identity(policy)
    wisdom = make_wisdom_policy(wisdom_model, wisdom_endpoint, config=config)
    items_path = items_path_for(out) if out else default_items_path(tasks, model_id, config.home_dir)
    max_new_tokens = max_new_tokens or config.max_new_tokens
    err.print(f"{len(tasks.rows)} items from {tasks.path}; model {model_id}; items file {items_path}", highlight=False)
    if tasks.phrasing:
        err.print(f"questions reworded from the {tasks.phrasing!r} phrasing pool (foveate.world.phrasings)")

    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    walls: dict[str, dict[str, float]] = {}
    with Progress(*columns, console=err) as bar:
        bars: dict[str, int] = {}

        def on_progress(strategy: str, done: int, total: int) -> None:
            if strategy not in bars:
                bars[strategy] = bar.add_task(strategy, total=total)
            bar.update(bars[strategy], completed=done)

        records = run_eval(
            tasks,
            names,
            policy,
            items_path=items_path,
            store=ImageStore(config.home_dir / "images"),
            model_id=model_id,
            max_new_tokens=max_new_tokens,
            max_batch=batch_size,
            concurrency=concurrency,
            progress=on_progress,
            strategy_options=options,
            walls=walls,
            wisdom=wisdom,
        )
    rows = aggregate(records, names)
    # Piped output is not squeezed into 80 columns: tables stay readable in logs and files.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    print_tables(rows, console)
    print_run_times(walls, console)
    if out:
        document = results_json(
            rows,
            task=tasks.name,
            task_key=tasks.key,
            model=model_id,
            n=len(tasks.rows),
            seed=tasks.seed,
            strategies=names,
            max_new_tokens=max_new_tokens,
            items_file=str(items_path),
            run_wall=walls,
        )
        err.print(f"results written to {write_results(out, document)}", highlight=False)
