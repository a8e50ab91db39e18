"""Policy construction: the backend a configuration names, cached per (model, endpoint, resolution, device).

``make_policy`` and ``default_policy`` (with ``make_wisdom_policy`` / ``default_wisdom`` for the LLM of text-only
roles) are what the API (`foveate.api`, which re-exports them), the CLI and the strategies' default context
(`agents.state.resolve_context`) use, so notebooks and services that ask repeatedly load a model once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from importlib import resources
from pathlib import Path

from foveate.config import FoveateConfig, load_config
from foveate.errors import FoveateError
from foveate.policies.base import ChatPolicy

log = logging.getLogger(__name__)
DEMO_MODEL_DIR = Path(str(resources.files("foveate"))) / "assets" / "models" / "demo"
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
