"""Strategies: one LangGraph StateGraph per method, and the plain dict that names them.

Each module exposes ``build(checkpointer=None)`` returning a compiled graph and a module-level ``graph``
compiled without a checkpointer (what ``langgraph.json`` exports). A module may serve several names with
different options: `STRATEGY_OPTIONS` holds the keyword arguments its ``build`` gets for such a name, and the
user's config (``strategy_options`` in configs/default.yaml) can add or override keyword arguments per name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from importlib import import_module
from typing import Any

from foveate.errors import FoveateError

# name → module under foveate.agents; imported lazily so one strategy's imports never slow another's start.
STRATEGY_MODULES: dict[str, str] = {
    "deepeyes": "deepeyes",
    "direct": "direct",
    "oracle-crop": "oracle_crop",
    "patch-matters": "patch_matters",
    "proreason": "proreason",
    "vicrop-carve": "vicrop",
    "vicrop-grad": "vicrop",
    "vicrop-puregrad": "vicrop",
    "vicrop-rel": "vicrop",
    "vicrop-rel-blocks": "vicrop",
    "vicrop-rel-gate": "vicrop",
    "visrl": "visrl",
    "vpd": "vpd",
}

# name → options passed to that module's ``build`` (names not listed here build with no options).
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "vicrop-carve": {"method": "rel-att", "feed": "mask"},
    "vicrop-grad": {"method": "grad-att"},
    "vicrop-puregrad": {"method": "pure-grad"},
    "vicrop-rel": {"method": "rel-att"},
    "vicrop-rel-blocks": {"method": "rel-att", "high_res_block": 1024},  # the paper's high-resolution split
    "vicrop-rel-gate": {"method": "rel-att", "gate": 0.5},
}


def strategy_names() -> list[str]:
    return sorted(STRATEGY_MODULES)


def get_builder(name: str, options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The ``build`` function of a strategy with its registered options plus ``options`` (e.g. the config's
    ``{"max_turns": 3}`` for deepeyes); unknown names or options fail with the valid ones listed."""
    if name not in STRATEGY_MODULES:
        raise FoveateError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}")
    build = import_module(f"foveate.agents.{STRATEGY_MODULES[name]}").build
    merged = {**STRATEGY_OPTIONS.get(name, {}), **(options or {})}
    parameters = inspect.signature(build).parameters
    accepted = [name for name, p in parameters.items() if name != "checkpointer" and p.kind != p.VAR_KEYWORD]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters.values())  # its build validates them itself
    unknown = sorted(set(merged) - set(accepted))
    if unknown and not open_ended:
        valid = ", ".join(accepted) or "none"
        raise FoveateError(f"strategy {name!r} has no option {', '.join(unknown)}; its options: {valid}")
    return functools.partial(build, **merged) if merged else build
