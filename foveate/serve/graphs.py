"""Compiled graphs for the strategy names a module serves with options, as attributes ``langgraph.json`` can name.

A strategy module exports one ``graph`` (its default options). Names registered with options in
``agents.STRATEGY_OPTIONS`` (``vicrop-grad`` = ViCrop with ``method="grad-att"``, …) need a graph of their own,
so this module compiles ``get_builder(name)()`` for each of them at import, under the name with every
non-identifier character replaced by ``_``: ``./foveate/serve/graphs.py:vicrop_grad``. Like the modules' own
``graph``, they are compiled without a checkpointer (the LangGraph server brings persistence).
"""

from __future__ import annotations

import re

from foveate import agents


def attribute_name(strategy: str) -> str:
    """``vicrop-rel-gate`` → ``vicrop_rel_gate``."""
    return re.sub(r"\W", "_", strategy)


for _name in sorted(getattr(agents, "STRATEGY_OPTIONS", {})):
    globals()[attribute_name(_name)] = agents.get_builder(_name)()
