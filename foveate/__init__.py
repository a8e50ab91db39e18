"""foveate: perceive-reason loops that make vision-language models look harder before they answer.

``from foveate import ask`` is the entry point for notebooks and services (see ``foveate.api``). Heavy
imports (torch, transformers, LangGraph) happen on first use, so ``import foveate`` stays cheap.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ask", "make_policy", "AskResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("ask", "make_policy", "AskResult"):
        from foveate import api

        return getattr(api, name)
    raise AttributeError(f"module 'foveate' has no attribute {name!r}")
