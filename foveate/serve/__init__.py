"""Serving strategies: an OpenAI-compatible API with traces, a chat page, and the shared run loop.

``create_app(policy)`` builds the FastAPI app (``foveate serve`` runs it with uvicorn); ``ServeLimits`` holds the
request limits; ``iter_run`` drives a strategy graph step by step (also used by ``foveate chat``).
"""

from foveate.serve.limits import APIError, ServeLimits
from foveate.serve.streaming import iter_run

__all__ = ["APIError", "ServeLimits", "create_app", "iter_run", "serve_in_thread"]


def __getattr__(name: str):
    # The web stack (FastAPI, uvicorn) is imported only by what needs it: `foveate chat` uses iter_run alone.
    if name in ("create_app", "serve_in_thread"):
        from foveate.serve import app

        return getattr(app, name)
    raise AttributeError(name)
