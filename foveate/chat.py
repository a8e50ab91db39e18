"""``foveate chat IMAGE``: a terminal conversation about an image, kept in durable threads.

    foveate chat examples/world/images/large-7-000002.png                  # prints the new thread id
    foveate chat examples/world/images/large-7-000002.png --thread 3f2a9c  # resume it, even after a restart
    printf 'What shape is it?\\nAnd its colour?\\n' | foveate chat scene.png --json   # scripted, one JSON per turn

Every turn is one run of the strategy graph compiled with LangGraph's SQLite checkpointer
(``$FOVEATE_HOME/threads.sqlite``), keyed by the thread id: the graph's ``messages`` accumulate, so a follow-up
question goes to the model together with every earlier question and answer of the thread. The image is stored
in the image store and enters the transcript once, as a ref; giving a different IMAGE when resuming a thread
adds that image with the next question, which is then about it.

Questions come from the terminal (interactive) or from stdin, one per line; ``/exit`` or end of input stops.
The strategy's steps (model calls, zooms, maps, tool calls) are printed as they happen, then the answer.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from importlib import import_module
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from foveate.errors import FoveateError

EXIT_COMMANDS = {"/exit", "/quit", "/q"}


def threads_path(home: Path) -> Path:
    return home / "threads.sqlite"


def forget_turn(graph: Any, before: dict[str, Any], thread_id: str) -> None:
    """Put a thread back where it was before a turn that failed, so the failed question is not in its history
    (the checkpointer saved it before the graph ran): the thread's last checkpoint becomes a copy of the one the
    turn started from, or, for a thread the turn started, the thread is deleted."""
    if before.get("configurable", {}).get("checkpoint_id"):
        graph.update_state(before, None, as_node="__copy__")
    else:
        graph.checkpointer.delete_thread(thread_id)


def describe_step(step: dict[str, Any]) -> str | None:
    """One line for a trace step (None for the answer step: the answer is shown on its own)."""
    kind, node = step.get("kind"), step.get("node", "")
    if kind == "model_call":
        outputs = " | ".join(text.strip().replace("\n", " ")[:80] for text in step.get("outputs", []))
        return (
            f"model call ({node}): {step.get('prompt_tokens', 0)} prompt tokens → "
            f"{step.get('completion_tokens', 0)} generated, {step.get('latency_s', 0):.2f} s: {outputs}"
        )
    if kind == "crop":
        box = ", ".join(f"{v:g}" for v in step.get("box", []))
        reason = f" — {step['reason']}" if step.get("reason") else ""
        return f"zoom ({node}) into [{box}]{reason}"
    if kind == "map":
        return f"{step.get('map_kind', 'saliency')} map ({node}), layer {step.get('layer')}"
    if kind == "tool_call":
        outcome = f"error: {step['error']}" if step.get("error") else str(step.get("result"))[:120]
        return f"tool {step.get('name')}({json.dumps(step.get('arguments'))[:120]}) → {outcome}"
    if kind == "program":
        outcome = step.get("outcome")
        if outcome is None:
            return f"program {step.get('index', 0)} ({node}): not run"
        result = f"value {json.dumps(outcome.get('value'))[:80]}" if outcome.get("ok") else outcome.get("error", "")
        return f"program {step.get('index', 0)} ({node}): {len(outcome.get('log', []))} calls → {result}"
    if kind == "role":
        return f"{step.get('role')} ({node}): {json.dumps(step.get('content'))[:160]}"
    if kind == "answer":
        return None
    return f"{kind} ({node})"


def read_questions(stream: TextIO, console: Console) -> Iterator[str]:
    """Questions, one per line: prompted on a terminal, read plainly from a pipe."""
    interactive = stream.isatty()
    while True:
        try:
            line = console.input("[bold cyan]you ›[/bold cyan] ") if interactive else stream.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and line == "":
            return
        question = line.strip()
        if question in EXIT_COMMANDS:
            return
        if question:
            yield question


def run_chat(
    image: str | Path,
    *,
    thread: str | None = None,
    strategy: str | None = None,
    model: str | None = None,
    endpoint: str | None = None,
    max_new_tokens: int | None = None,
    as_json: bool = False,
    wisdom_model: str | None = None,
    wisdom_endpoint: str | None = None,
    questions: TextIO | None = None,
    out: TextIO | None = None,
) -> str:
    """Chat about ``image`` in thread ``thread`` (new when None); returns the thread id."""
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.sqlite import SqliteSaver

    from foveate.agents import STRATEGY_MODULES, get_builder
    from foveate.agents.state import FoveateContext
    from foveate.api import make_policy, make_wisdom_policy
    from foveate.config import load_config
    from foveate.serve.streaming import iter_run, make_trace
    from foveate.tools.images import load_image
    from foveate.tools.store import ImageStore

    config = load_config()
    strategy = strategy or config.strategy
    builder = get_builder(strategy, config.options_for(strategy))  # unknown strategies fail before anything loads
    module = import_module(f"foveate.agents.{STRATEGY_MODULES[strategy]}")
    if getattr(module, "REQUIRES_EVIDENCE", False):
        raise FoveateError(f"strategy {strategy!r} needs ground-truth evidence boxes; it runs in `foveate eval` only")
    if not Path(image).exists():
        raise FoveateError(f"image file not found: {image}")
    store = ImageStore(config.home_dir / "images")
    ref = store.put(load_image(Path(image), max_pixels=config.max_image_pixels))
    stdout = out or sys.stdout
    show = Console(file=stdout, soft_wrap=True, highlight=False)  # answers and steps
    info = Console(file=sys.stderr if as_json else stdout, soft_wrap=True, highlight=False)
    policy = make_policy(model, endpoint, config=config)
    wisdom = make_wisdom_policy(wisdom_model, wisdom_endpoint, config=config)
    thread_id = thread or uuid.uuid4().hex[:12]
    db = threads_path(config.home_dir)
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, check_same_thread=False)) as connection:
        graph = builder(checkpointer=SqliteSaver(connection))
        run_config = {"configurable": {"thread_id": thread_id}}
        earlier = graph.get_state(run_config).values
        turns = sum(1 for message in earlier.get("messages", []) if message.type == "human")
        if turns:
            info.print(f"[bold]thread {thread_id}[/bold] resumed ({turns} earlier question{'s' * (turns != 1)})")
        else:
            info.print(f"[bold]thread {thread_id}[/bold] (new; resume with --thread {thread_id})")
        current_image = earlier.get("image")
        context = FoveateContext(
            policy=policy, wisdom=wisdom, store=store, max_new_tokens=max_new_tokens or config.max_new_tokens
        )
        for question in read_questions(questions or sys.stdin, info):
            parts: list[dict[str, Any]] = [] if current_image == ref else [{"type": "image", "ref": ref}]
            parts.append({"type": "text", "text": question})
            inputs = {"messages": [HumanMessage(content=parts)], "image": ref}
            steps: list[dict[str, Any]] = []
            before = graph.get_state(run_config)
            try:
                for kind, value in iter_run(graph, inputs, context=context, config=run_config):
                    if kind == "step":
                        steps.append(value)
                        line = describe_step(value)
                        if line and not as_json:
                            show.print(Text(f"  · {line}", style="dim"))
                    else:
                        trace = make_trace(strategy, value, steps, policy.name)
            except FoveateError as error:
                info.print(Text.assemble(("error:", "red"), f" {error}"))  # the message as text, not markup
                forget_turn(graph, before.config, thread_id)
                continue
            current_image = ref
            if as_json:
                record = {"thread": thread_id, "question": question, "answer": trace.answer, "trace": trace.to_dict()}
                stdout.write(json.dumps(record) + "\n")
                stdout.flush()
            else:
                show.print(
                    Panel(Text(trace.answer or "(no answer)"), title=strategy, title_align="left", border_style="green")
                )
        info.print(
            f"thread {thread_id} saved in {db}; resume with: foveate chat {image} --thread {thread_id}", markup=False
        )
    return thread_id
