"""``langgraph.json`` exports every strategy graph the way ``langgraph dev`` loads it: each ``./path.py:graph`` is
imported by file path, must be a compiled graph without a checkpointer that keeps a ``messages`` channel, and runs
a step on the tiny model from an agent-chat-ui style input (OpenAI-style message dicts, the image as a data URL)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from langgraph.pregel import Pregel
from PIL import Image, ImageDraw

from foveate.agents import STRATEGY_MODULES, get_builder
from foveate.agents.state import FoveateContext
from foveate.serve.langgraph_config import langgraph_config
from foveate.tools.images import image_to_data_url
from foveate.tools.store import ImageStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = json.loads((ROOT / "langgraph.json").read_text())


def test_every_registered_strategy_is_exported():
    assert CONFIG["dependencies"] == ["."]
    assert langgraph_config() == CONFIG, (
        "langgraph.json is out of date with agents/__init__.py; regenerate it with "
        "`python -m foveate.serve.langgraph_config --write`"
    )
    assert set(CONFIG["graphs"]) == set(STRATEGY_MODULES)


def load_by_path(spec: str):
    """What langgraph-cli does with ``./file.py:attr``: import the file under a fresh module name, get the attr."""
    path, attribute = spec.rsplit(":", 1)
    file = (ROOT / path).resolve()
    assert file.is_file() and file.is_relative_to(ROOT), spec
    name = f"langgraph_graph_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module, getattr(module, attribute)


@pytest.mark.parametrize("name", sorted(CONFIG["graphs"]))
def test_exported_graph_loads_and_runs_a_step(name, tiny_policy, tmp_path):
    _, graph = load_by_path(CONFIG["graphs"][name])
    assert isinstance(graph, Pregel), f"{name}: {type(graph).__name__} is not a compiled graph"
    assert graph.checkpointer is None  # the LangGraph server supplies persistence
    assert "messages" in graph.channels  # Studio and agent-chat-ui talk through `messages`
    assert graph.config == get_builder(name)().config  # a name's registered options (vicrop-grad, …) are baked in

    image = Image.new("RGB", (160, 120), "white")
    ImageDraw.Draw(image).rectangle((20, 20, 70, 60), fill="red")
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_to_data_url(image)}},
            {"type": "text", "text": "What color is the square?"},
        ],
    }
    inputs = {"messages": [message]}
    strategy_module = importlib.import_module(f"foveate.agents.{STRATEGY_MODULES[name]}")
    if getattr(strategy_module, "REQUIRES_EVIDENCE", False):
        inputs["evidence_boxes"] = [[20, 20, 70, 60]]
    store = ImageStore(tmp_path / "images")
    context = FoveateContext(policy=tiny_policy, store=store, max_new_tokens=4)
    updates = []
    for update in graph.stream(inputs, context=context, stream_mode="updates"):
        updates.append(update)
        if any(isinstance(u, dict) and u.get("steps") for u in update.values()):
            break  # one step that reached the model is enough
    nodes = [node for update in updates for node in update]
    steps = [step for update in updates for u in update.values() if isinstance(u, dict) for step in u.get("steps", [])]
    assert nodes[0] == "intake" and steps, f"{name}: no traced step in {nodes}"
    assert all(isinstance(step, dict) and "kind" in step for step in steps)
    assert store.ref_for(image) in store  # the data URL was stored as a ref
