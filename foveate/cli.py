"""The ``foveate`` command line.

    foveate ask IMAGE QUESTION [--strategy direct] [--model DIR_OR_ID | --endpoint URL --model NAME]
                               [--trace out.html] [--json]
    foveate model init-tiny OUT_DIR [--seed 0]
    foveate world generate --out DIR --n N --seed S --preset NAME
    foveate eval --task world:small-detail --strategies direct,oracle-crop [--n N] [--out results.json]
    foveate data convert vstar|pope|textvqa PATH --out DIR [--images DIR]
    foveate serve [--host 127.0.0.1] [--port 8000] [--model DIR_OR_ID | --endpoint URL --model NAME]
    foveate chat IMAGE [--thread ID] [--strategy direct] [--model …] [--json]
    foveate caption INPUT --out caps.jsonl [--strategy direct] [--workers N] [--ray-address ADDR] [--format parquet]
    foveate train grpo|dpo --config configs/rl/deepeyes.yaml|visrl.yaml [--max-steps N] [--ray-workers N]
    foveate plot RUN_DIR
    foveate vicrop calibrate [--model DIR] [--task world:small-detail] [--n 50] [--method rel-att] [--gate]

Errors a user can cause (missing files, unreadable images, unknown strategies, unloadable models, unreachable
endpoints) print one line on stderr and exit with status 2; anything else prints one line and exits 1
(set FOVEATE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from foveate.config import parse_options
from foveate.errors import FoveateError

app = typer.Typer(help="Make vision-language models look harder before they answer.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
err = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line however narrow the terminal


def _mount_optional(name: str, module: str, attribute: str) -> None:
    """Mount a sub-command group whose module may depend on optional parts of a checkout."""
    try:
        sub_app = getattr(__import__(module, fromlist=[attribute]), attribute)
    except ImportError:
        return
    app.add_typer(sub_app, name=name)


train_app = typer.Typer(
    help="Train models: SFT on world data or TRL rows (sft), DeepEyes GRPO (grpo), VisRL DPO (dpo).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")
_mount_optional("world", "foveate.world.cli", "world_app")
_mount_optional("data", "foveate.eval.data_cli", "data_app")
from foveate.rl_cli import plot_command, train_dpo, train_grpo  # noqa: E402 - the RL recipes' commands

train_app.command("grpo")(train_grpo)
train_app.command("dpo")(train_dpo)
app.command("plot")(plot_command)
_mount_optional("vicrop", "foveate.vicrop_calibrate", "vicrop_app")

try:  # `foveate eval --task … --strategies …` is a single command, so it is mounted with app.command
    from foveate.eval.cli import eval_command
except ImportError:
    pass
else:
    app.command("eval")(eval_command)

try:  # `foveate caption INPUT --out OUT` (batch jobs, local or on Ray Data)
    from foveate.jobs.cli import caption_command
except ImportError:
    pass
else:
    app.command("caption")(caption_command)


@app.command()
def ask(
    image: str = typer.Argument(..., help="image file (PNG, JPEG, GIF, WebP, …)"),
    question: str = typer.Argument(..., help="the question about the image"),
    strategy: str = typer.Option(None, "--strategy", "-s", help="strategy name (default from config: direct)"),
    model: str = typer.Option(None, "--model", "-m", help="model directory or Hub id; with --endpoint: model name"),
    endpoint: str = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"),
    wisdom_model: str = typer.Option(None, "--wisdom-model", help="LLM of text-only roles (proreason, vpd)"),
    wisdom_endpoint: str = typer.Option(None, "--wisdom-endpoint", help="OpenAI-compatible URL of that LLM"),
    trace: Path = typer.Option(None, "--trace", help="write the trace here (.html page or .json)"),
    as_json: bool = typer.Option(False, "--json", help="print the answer and trace as JSON"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="answer length cap per model call"),
    option: list[str] = typer.Option(None, "--option", "-o", help="strategy build option KEY=VALUE (repeatable)"),
) -> None:
    """Answer a question about an image and optionally save the trace."""
    from foveate.agents import get_builder
    from foveate.api import ask as ask_api
    from foveate.config import load_config
    from foveate.tools.store import ImageStore

    config = load_config()
    strategy = strategy or config.strategy
    get_builder(strategy)  # unknown strategies fail before any model loads
    if not Path(image).exists():
        raise FoveateError(f"image file not found: {image}")
    options = parse_options(option)  # the API checks them (building the graph) before it loads the model
    result = ask_api(
        image,
        question,
        strategy=strategy,
        model=model,
        endpoint=endpoint,
        max_new_tokens=max_new_tokens,
        options=options,
        wisdom_model=wisdom_model,
        wisdom_endpoint=wisdom_endpoint,
    )
    if trace:
        written = result.trace.save(trace, ImageStore(config.home_dir / "images"))
        err.print(f"trace written to {written}", markup=False)
    if as_json:
        typer.echo(json.dumps({"answer": result.answer, "trace": result.trace.to_dict()}, indent=2))
    elif result.answer:
        typer.echo(result.answer)
    else:
        # A strategy that ends without an answer (e.g. DeepEyes at its turn limit) says why, and the exit code
        # tells scripts there is nothing on stdout to read.
        outcomes = [step["outcome"] for step in result.trace.steps if step.get("outcome")]
        err.print(outcomes[-1] if outcomes else "no answer: the model wrote an empty answer", markup=False)
        raise typer.Exit(1)


@model_app.command("init-tiny")
def init_tiny(
    out_dir: Path = typer.Argument(..., help="directory to create"),
    seed: int = typer.Option(0, help="weight initialisation seed"),
    max_pixels: int = typer.Option(224 * 224, help="processor upper bound on input pixels"),
    merge_size: int = typer.Option(2, help="patches merged into one image token, per side (Qwen2-VL: 2)"),
    question_first: bool = typer.Option(False, help="chat template renders a user turn's text before its images"),
) -> None:
    """Create a tiny random Qwen2-VL model (tokenizer, processor, chat template) for tests and experiments."""
    from foveate.policies.tiny import TinyConfig, build_tiny_model

    if out_dir.exists() and any(out_dir.iterdir()):
        raise FoveateError(f"{out_dir} exists and is not empty")
    config = TinyConfig(seed=seed, max_pixels=max_pixels, merge_size=merge_size, question_first=question_first)
    path = build_tiny_model(out_dir, config)
    typer.echo(f"tiny Qwen2-VL model written to {path}")


@train_app.command("sft")
def train_sft(
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="recipe YAML (model / data / train)"),
    output_dir: Path = typer.Option(
        None,
        "--output-dir",
        help="where the model goes (default: the recipe's output_dir, else $FOVEATE_HOME/models/<recipe>-rebuild)",
    ),
    replace_shipped: bool = typer.Option(
        False, "--replace-shipped", help="write into the shipped demo model's directory (foveate/assets/models/demo)"
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="override train.max_steps (e.g. a quick smoke run)"),
    start_stage: int = typer.Option(1, "--start-stage", help="resume at this stage (earlier ones saved in .work)"),
    init_from: Path = typer.Option(None, "--init-from", help="override the recipe's init_from (a model directory)"),
    data: Path = typer.Option(None, "--data", help="train with TRL's SFTTrainer on these JSON-lines rows instead"),
) -> None:
    """Supervised fine-tuning on world data (the recipe that builds the demo model), or with --data on a file of
    TRL conversational rows (e.g. from `foveate vpd distill`), from --init-from (default: the demo model)."""
    if data:
        from foveate.api import default_model_path
        from foveate.rl.trl_sft import TRLSFTSettings, train_trl_sft

        if not output_dir:
            raise FoveateError("--data needs --output-dir (where the fine-tuned model goes)")
        settings = TRLSFTSettings(**({"max_steps": max_steps} if max_steps else {}))
        typer.echo(f"model written to {train_trl_sft(data, init_from or default_model_path(), output_dir, settings)}")
        return
    from foveate.config import load_config
    from foveate.rl.sft import load_recipe
    from foveate.rl.sft import train_sft as run

    recipe = load_recipe(config)
    default = load_config().home_dir / "models" / f"{config.stem}-rebuild"
    recipe.output_dir = str(sft_output_dir(recipe.output_dir, output_dir, replace_shipped, default))
    if init_from:
        recipe.init_from = str(init_from)
    if max_steps:
        for stage in recipe.all_stages():
            stage.train.max_steps = max_steps
    err.print(f"training into {recipe.output_dir}", markup=False)
    typer.echo(f"model written to {run(recipe, start_stage=start_stage)}")


def sft_output_dir(recipe_dir: str | None, option: Path | None, replace_shipped: bool, default: Path) -> Path:
    """Where `train sft` writes: ``--output-dir``, else the recipe's ``output_dir``, else ``default``. The shipped
    demo model is replaced only when asked: ``--replace-shipped``, or ``--output-dir`` naming its directory."""
    from foveate.api import DEMO_MODEL_DIR

    shipped = DEMO_MODEL_DIR.resolve()
    if replace_shipped:
        if option is not None and option.resolve() != shipped:
            raise FoveateError(f"--replace-shipped writes to {shipped}; it contradicts --output-dir {option}")
        return shipped
    if option is not None:
        return option
    target = Path(recipe_dir) if recipe_dir else default
    if target.resolve() == shipped:
        raise FoveateError(
            f"the recipe writes into the shipped demo model ({shipped}): pass --replace-shipped to replace it, "
            "or --output-dir DIR to write elsewhere"
        )
    return target


vpd_app = typer.Typer(
    help="Visual Program Distillation: programs → verified executions → SFT data.", no_args_is_help=True
)
app.add_typer(vpd_app, name="vpd")


@vpd_app.command("distill")
def vpd_distill(
    task: str = typer.Option(..., "--task", "-t", help="world:<preset> or a tasks.jsonl with labels"),
    out: Path = typer.Option(..., "--out", help="SFT rows (JSON lines, TRL conversational with image paths)"),
    n: int = typer.Option(None, "--n", help="number of items"),
    seed: int = typer.Option(0, "--seed", help="world seed (a training seed; eval uses 1000) and sampling seed"),
    k: int = typer.Option(5, "--k", min=1, help="programs sampled per item"),
    temperature: float = typer.Option(0.7, "--temperature", help="programmer sampling temperature (k > 1)"),
    max_program_tokens: int = typer.Option(384, "--max-program-tokens", help="length cap of each program"),
    model: str = typer.Option(None, "--model", "-m", help="the VLM (eyesight) answering the programs' queries"),
    endpoint: str = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL of that VLM"),
    wisdom_model: str = typer.Option(None, "--wisdom-model", help="programmer and rewriter LLM (default: the VLM)"),
    wisdom_endpoint: str = typer.Option(None, "--wisdom-endpoint", help="OpenAI-compatible URL of that LLM"),
    world_programs: bool = typer.Option(
        False, "--world-programs", help="programs from the world's question templates (no programmer LLM)"
    ),
) -> None:
    """Sample programs per labelled item, keep the first verified one, rewrite it into a rationale, write SFT rows."""
    from foveate.api import make_policy, make_wisdom_policy
    from foveate.config import load_config
    from foveate.eval.runner import resolve_tasks
    from foveate.rl.vpd_distill import distill, write_rows

    config = load_config()
    tasks = resolve_tasks(task, n=n, seed=seed)
    eyesight = make_policy(model, endpoint, config=config)
    programmer = make_wisdom_policy(wisdom_model, wisdom_endpoint, config=config)
    if not world_programs:
        programmer = programmer or eyesight
    rows, stats = distill(
        tasks.rows,
        programmer,
        eyesight,
        k=k,
        temperature=temperature,
        seed=seed,
        max_program_tokens=max_program_tokens,
        world_programs=world_programs,
    )
    written = write_rows(rows, out)
    typer.echo(json.dumps({"out": str(written), "rows": len(rows), **vars(stats)}))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    model: str = typer.Option(None, "--model", "-m", help="model directory or Hub id; with --endpoint: model name"),
    endpoint: str = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL of the underlying VLM"),
    wisdom_model: str = typer.Option(None, "--wisdom-model", help="LLM of text-only roles (proreason, vpd)"),
    wisdom_endpoint: str = typer.Option(None, "--wisdom-endpoint", help="OpenAI-compatible URL of that LLM"),
    strategies: str = typer.Option(None, "--strategies", help="comma-separated strategies to serve (default: all)"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="per model call, when a request sets none"),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="largest request body, in MiB (413 above)"),
    max_image_pixels: int = typer.Option(None, "--max-image-pixels", help="largest image, width × height (413)"),
    max_images: int = typer.Option(8, "--max-images", help="most images in one request"),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="seconds before a request gets 504"),
    allow_remote_images: bool = typer.Option(
        False, "--allow-remote-images", help="fetch http(s) image URLs (off: only data: URLs are accepted)"
    ),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="merge concurrent model calls"),
    max_batch: int = typer.Option(16, "--max-batch", help="most conversations in one batched model call"),
) -> None:
    """Serve every strategy as an OpenAI-compatible model (foveate-<strategy>) plus a chat page at /."""
    import uvicorn

    from foveate.api import make_policy, make_wisdom_policy
    from foveate.config import load_config
    from foveate.serve.app import create_app
    from foveate.serve.limits import ServeLimits
    from foveate.tools.store import ImageStore

    config = load_config()
    limits = ServeLimits(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_image_pixels=max_image_pixels or config.max_image_pixels,
        max_images=max_images,
        request_timeout_s=request_timeout,
        max_new_tokens=max_new_tokens or config.max_new_tokens,
        allow_remote_images=allow_remote_images,
    )
    names = [name.strip() for name in strategies.split(",") if name.strip()] if strategies else None
    policy = make_policy(model, endpoint, config=config)
    app_ = create_app(
        policy,
        wisdom=make_wisdom_policy(wisdom_model, wisdom_endpoint, config=config),
        store=ImageStore(config.home_dir / "images"),
        limits=limits,
        batching=batching,
        max_batch=max_batch,
        strategies=names,
    )
    served = ", ".join(f"foveate-{name}" for name in sorted(app_.state.server.graphs))
    err.print(f"serving {served} over {policy.name} at http://{host}:{port}/v1 (chat page: http://{host}:{port}/)")
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


@app.command()
def chat(
    image: str = typer.Argument(..., help="image file to talk about"),
    thread: str = typer.Option(None, "--thread", "-t", help="thread id to resume (default: a new thread)"),
    strategy: str = typer.Option(None, "--strategy", "-s", help="strategy name (default from config: direct)"),
    model: str = typer.Option(None, "--model", "-m", help="model directory or Hub id; with --endpoint: model name"),
    endpoint: str = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="answer length cap per model call"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (answer and trace) per turn"),
    wisdom_model: str = typer.Option(None, "--wisdom-model", help="LLM of text-only roles (proreason, vpd)"),
    wisdom_endpoint: str = typer.Option(None, "--wisdom-endpoint", help="OpenAI-compatible URL of that LLM"),
) -> None:
    """Chat about an image; threads persist in $FOVEATE_HOME/threads.sqlite and resume with --thread."""
    from foveate.chat import run_chat

    run_chat(
        image,
        thread=thread,
        strategy=strategy,
        model=model,
        endpoint=endpoint,
        max_new_tokens=max_new_tokens,
        as_json=as_json,
        wisdom_model=wisdom_model,
        wisdom_endpoint=wisdom_endpoint,
    )


def _quiet_libraries() -> None:
    """Progress bars and info logs from transformers would bury the one line a user wants."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn errors into one line."""
    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except FoveateError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)  # a message's [..] is not markup
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 — the CLI promises one line, never a traceback
        # Usage errors of typer's click (which may be a vendored copy, hence duck typing) print themselves.
        if hasattr(error, "show") and hasattr(error, "exit_code"):
            if type(error).__name__ != "NoArgsIsHelpError":  # help was already printed for bare `foveate`
                error.show()
            sys.exit(error.exit_code)
        if os.environ.get("FOVEATE_DEBUG"):
            raise
        detail = escape(f"{type(error).__name__}: {error}")
        err.print(f"[red]internal error:[/red] {detail} (FOVEATE_DEBUG=1 shows the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
