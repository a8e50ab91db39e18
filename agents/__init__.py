"""Strategies: one LangGraph StateGraph per method, and the plain dict that names them.

Each module exposes ``build(checkpointer=None)`` returning a compiled graph and a module-level ``graph``
compiled without a checkpointer (what ``langgraph.json`` exports). A module may serve several names with
different options: `STRATEGY_OPTIONS` holds the keyword arguments its ``build`` gets for such a name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import import_module
from typing import Any

from foveate.errors import FoveateError

# name → module under foveate.agents; imported lazily so one strategy's imports never slow another's start.
STRATEGY_MODULES: dict[str, str] = {
    "deepeyes": "deepeyes",
    "direct": "direct",
    "oracle-crop": "oracle_crop",
    "vicrop-carve": "vicrop",
    "vicrop-grad": "vicrop",
    "vicrop-puregrad": "vicrop",
    "vicrop-rel": "vicrop",
    "vicrop-rel-gate": "vicrop",
    "visrl": "visrl",
}

# name → options passed to that module's ``build`` (names not listed here build with no options).
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "vicrop-carve": {"method": "rel-att", "feed": "mask"},
    "vicrop-grad": {"method": "grad-att"},
    "vicrop-puregrad": {"method": "pure-grad"},
    "vicrop-rel": {"method": "rel-att"},
    "vicrop-rel-gate": {"method": "rel-att", "gate": 0.5},
}


def strategy_names() -> list[str]:
    return sorted(STRATEGY_MODULES)


def get_builder(name: str) -> Callable[..., Any]:
    """The ``build`` function of a strategy, or a clear error naming the known ones."""
    if name not in STRATEGY_MODULES:
        raise FoveateError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}")
    build = import_module(f"foveate.agents.{STRATEGY_MODULES[name]}").build
    options = STRATEGY_OPTIONS.get(name)
    return functools.partial(build, **options) if options else build
