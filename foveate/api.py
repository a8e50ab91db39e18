"""The Python API: ``ask(image, question, strategy=..., model=..., endpoint=...)`` and policy construction.

    >>> from foveate import ask
    >>> result = ask("examples/scene.png", "What color is the star?")     # doctest: +SKIP
    >>> result.answer, result.trace.model_calls                            # doctest: +SKIP

Policies are cached per (model, endpoint, resolution, device) so notebooks and services that call ``ask``
repeatedly load a model once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foveate.config import FoveateConfig, load_config
from foveate.errors import FoveateError
from foveate.policies.base import ChatPolicy
from foveate.tools.images import load_image
from foveate.tools.store import ImageStore
from foveate.trace import Trace

log = logging.getLogger(__name__)
DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "models" / "demo"
_policies: dict[tuple, ChatPolicy] = {}
_policies_lock = threading.Lock()


def default_model_path(config: FoveateConfig | None = None) -> Path:
    """The bundled demo VLM; if a source checkout lacks it, an untrained tiny model built once (with a warning)."""
    if (DEMO_MODEL_DIR / "config.json").exists():
        return DEMO_MODEL_DIR
    config = config or load_config()
    fallback = config.home_dir / "models" / "tiny-untrained"
    if not (fallback / "config.json").exists():
        from foveate.policies.tiny import build_tiny_model

        log.warning("demo model not found at %s; building an UNTRAINED tiny model at %s", DEMO_MODEL_DIR, fallback)
        build_tiny_model(fallback)
    return fallback


def make_policy(
    model: str | None = None,
    endpoint: str | None = None,
    *,
    config: FoveateConfig | None = None,
    cache: bool = True,
) -> ChatPolicy:
    """A backend: the OpenAI-compatible HTTP one when ``endpoint`` is given (``model`` = the served name),
    else the transformers one on ``model`` (a directory or cached Hub id; None = the demo VLM)."""
    config = config or load_config()
    endpoint = endpoint or config.endpoint
    model = model or (config.endpoint_model if endpoint else config.model)
    key = (model, endpoint, config.min_pixels, config.max_pixels, config.device)
    with _policies_lock:
        if cache and key in _policies:
            return _policies[key]
        if endpoint:
            from foveate.policies.openai_http import OpenAIChatPolicy

            if not model:
                raise FoveateError("--endpoint needs --model NAME (the model name the server serves)")
            policy: ChatPolicy = OpenAIChatPolicy(endpoint, model)
        else:
            from foveate.policies.transformers_vlm import TransformersVLM

            policy = TransformersVLM(
                model or default_model_path(config),
                device=config.device,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
            )
        if cache:
            _policies[key] = policy
        return policy


def make_wisdom_policy(
    model: str | None = None, endpoint: str | None = None, *, config: FoveateConfig | None = None
) -> ChatPolicy | None:
    """The wisdom LLM (text-only roles) from arguments or the config's ``wisdom_model``/``wisdom_endpoint``;
    None when neither names one (strategies then use the eyesight policy)."""
    config = config or load_config()
    model, endpoint = model or config.wisdom_model, endpoint or config.wisdom_endpoint
    if not (model or endpoint):
        return None
    if endpoint and not model:
        raise FoveateError("--wisdom-endpoint needs --wisdom-model NAME (the model name the server serves)")
    # The eyesight backend's endpoint must not leak into a local wisdom model (make_policy falls back to it).
    own = dataclasses.replace(config, model=None, endpoint=None, endpoint_model=None)
    return make_policy(model, endpoint, config=own)


def default_wisdom() -> ChatPolicy | None:
    """The wisdom LLM the configuration names, or None."""
    return make_wisdom_policy()


def default_policy() -> ChatPolicy:
    """The policy named by the configuration (the demo VLM unless configured otherwise)."""
    return make_policy()


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
        model=getattr(policy, "name", ""),
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
