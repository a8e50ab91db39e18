"""The Python API: ``ask(image, question, strategy=..., model=..., endpoint=...)`` and policy construction.

    >>> from foveate import ask
    >>> result = ask("examples/scene.png", "What color is the star?")     # doctest: +SKIP
    >>> result.answer, result.trace.model_calls                            # doctest: +SKIP

Policies are cached per (model, endpoint, resolution, device) so notebooks and services that call ``ask``
repeatedly load a model once (`policies.factory`, re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foveate.config import load_config
from foveate.policies.base import ChatPolicy
from foveate.policies.factory import (  # noqa: F401 (the API's policy construction)
    DEMO_MODEL_DIR,
    default_model_path,
    default_policy,
    default_wisdom,
    make_policy,
    make_wisdom_policy,
)
from foveate.tools.images import load_image
from foveate.tools.store import ImageStore
from foveate.trace import Trace


@dataclass
class AskResult:
    """The answer and the full trace of how it was reached."""

    answer: str
    trace: Trace

    def __str__(self) -> str:
        return self.answer


def run_strategy(
    graph: Any,
    inputs: dict[str, Any],
    *,
    strategy: str,
    policy: ChatPolicy,
    store: ImageStore,
    max_new_tokens: int = 128,
    thread_id: str | None = None,
    wisdom: ChatPolicy | None = None,
) -> AskResult:
    """Invoke a compiled strategy graph and package its final state as an answer plus trace."""
    from foveate.agents.state import FoveateContext

    run_config = {"configurable": {"thread_id": thread_id}} if thread_id else None
    context = FoveateContext(policy=policy, wisdom=wisdom, store=store, max_new_tokens=max_new_tokens)
    before = len(graph.get_state(run_config).values.get("steps", [])) if thread_id and graph.checkpointer else 0
    state = graph.invoke(inputs, config=run_config, context=context)
    trace = Trace(
        strategy=strategy,
        question=state.get("question", ""),
        image=state.get("image"),
        answer=state.get("answer", ""),
        steps=state.get("steps", [])[before:],  # a thread's earlier turns are not part of this answer's trace
        model=policy.name,
    )
    return AskResult(answer=trace.answer, trace=trace)


def ask(
    image: Any,
    question: str,
    strategy: str = "direct",
    model: str | None = None,
    endpoint: str | None = None,
    *,
    policy: ChatPolicy | None = None,
    store: ImageStore | None = None,
    max_new_tokens: int | None = None,
    options: dict[str, Any] | None = None,
    wisdom_model: str | None = None,
    wisdom_endpoint: str | None = None,
    wisdom: ChatPolicy | None = None,
) -> AskResult:
    """Answer ``question`` about ``image`` (path, bytes, data URL, base64 or PIL) with one strategy.

    ``model`` is a model directory or cached Hub id (default: the demo VLM); with ``endpoint`` (an
    OpenAI-compatible base URL) ``model`` is the served model's name. Pass ``policy`` to reuse a backend.
    ``options`` are the strategy's build options on top of the config's ``strategy_options``.
    ``wisdom_model``/``wisdom_endpoint`` (or a ``wisdom`` policy) name the LLM of text-only roles (ProReason,
    VPD); by default the config's, else the eyesight model.
    """
    from foveate.agents import get_builder

    config = load_config()
    graph = get_builder(strategy, {**config.options_for(strategy), **(options or {})})()
    loaded = load_image(image, max_pixels=config.max_image_pixels)
    policy = policy or make_policy(model, endpoint, config=config)
    wisdom = wisdom or make_wisdom_policy(wisdom_model, wisdom_endpoint, config=config)
    store = store or ImageStore(config.home_dir / "images")
    inputs = {"image": store.put(loaded), "question": question}
    return run_strategy(
        graph,
        inputs,
        strategy=strategy,
        policy=policy,
        store=store,
        max_new_tokens=max_new_tokens or config.max_new_tokens,
        wisdom=wisdom,
    )
