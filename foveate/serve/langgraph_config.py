"""``langgraph.json``: every registered strategy graph, for ``langgraph dev`` / LangGraph Studio / agent-chat-ui.

    python -m foveate.serve.langgraph_config --write     # regenerate langgraph.json after adding a strategy

A strategy built with no options points at its module's ``graph`` (``./agents/direct.py:graph``); a name that
a module serves with options (``agents.STRATEGY_OPTIONS``: ``vicrop-grad``, …) points at its own compiled graph
in ``foveate/serve/graphs.py``. All are compiled without a checkpointer (the LangGraph server brings its own
persistence). ``dependencies: ["."]`` installs this checkout, so the modules' absolute ``foveate.…`` imports
resolve wherever the files are loaded by path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def graph_path(name: str) -> str:
    """Where ``langgraph.json`` finds the compiled graph of strategy ``name``."""
    from foveate import agents
    from foveate.serve.graphs import attribute_name

    if name in getattr(agents, "STRATEGY_OPTIONS", {}):
        return f"./foveate/serve/graphs.py:{attribute_name(name)}"
    return f"./agents/{agents.STRATEGY_MODULES[name]}.py:graph"


def langgraph_config() -> dict[str, Any]:
    """The config for the strategies registered now (``agents/__init__.py``), in name order."""
    from foveate.agents import strategy_names

    return {"dependencies": ["."], "graphs": {name: graph_path(name) for name in strategy_names()}}


def render() -> str:
    return json.dumps(langgraph_config(), indent=2) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        (ROOT / "langgraph.json").write_text(render())
        print(f"wrote {ROOT / 'langgraph.json'}")
    else:
        sys.stdout.write(render())
