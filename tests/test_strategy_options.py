"""Strategy build options from the config (``strategy_options``) and the CLI (``foveate ask -o KEY=VALUE``),
what the server lists for a black-box backend, and the micro-batcher's exclusive lock for white-box calls."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from scripted import Scripted

from foveate.agents import get_builder
from foveate.cli import parse_options
from foveate.config import load_config
from foveate.errors import FoveateError


class Rambling(Scripted):
    """Never writes DeepEyes' tags, so the tool loop runs until its turn limit; ``seen`` counts the calls."""

    exhausted_reply = "I am not sure what to do."

    def __init__(self) -> None:
        super().__init__([])


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), "white").save(path)
    return path


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(FoveateError, match="no option max_turn; its options: max_turns"):
        get_builder("deepeyes", {"max_turn": 3})
    with pytest.raises(FoveateError, match="no option method"):
        get_builder("direct", {"method": "rel-att"})
    with pytest.raises(FoveateError):  # ViCrop takes open-ended options and checks them when its graph is built
        get_builder("vicrop-rel", {"layerz": 2})()


def test_parse_options_reads_yaml_scalars_and_rejects_malformed() -> None:
    assert parse_options(["max_turns=3", "gate=0.7", "feed=mask"]) == {"max_turns": 3, "gate": 0.7, "feed": "mask"}
    with pytest.raises(FoveateError, match="KEY=VALUE"):
        parse_options(["max_turns"])


@pytest.mark.parametrize("max_turns", [0, 2])
def test_config_max_turns_bounds_deepeyes_calls(tmp_path, image_path, monkeypatch, max_turns) -> None:
    from foveate.api import ask

    config = tmp_path / "config.yaml"
    config.write_text(f"strategy_options:\n  deepeyes: {{max_turns: {max_turns}}}\n")
    monkeypatch.setenv("FOVEATE_CONFIG", str(config))
    assert load_config().options_for("deepeyes") == {"max_turns": max_turns}
    policy = Rambling()
    result = ask(image_path, "What is it?", strategy="deepeyes", policy=policy)
    assert result.answer == "" and len(policy.seen) == max_turns + 1
    # An explicit option beats the config's.
    policy = Rambling()
    ask(image_path, "What is it?", strategy="deepeyes", policy=policy, options={"max_turns": 1})
    assert len(policy.seen) == 2


def test_packaged_config_sets_deepeyes_turns() -> None:
    assert load_config().options_for("deepeyes") == {"max_turns": 5, "tool_schema": False}
    with pytest.raises(FoveateError, match="mapping"):
        load_config().with_overrides(strategy_options={"deepeyes": 3}).options_for("deepeyes")


def test_black_box_backends_are_not_offered_vicrop(tmp_path) -> None:
    from foveate.serve.app import servable_strategies

    white = set(servable_strategies())
    black = set(servable_strategies(white_box=False))
    assert {"vicrop-rel", "vicrop-grad", "vicrop-rel-gate"} <= white
    assert not {name for name in black if name.startswith("vicrop")}
    assert {"direct", "deepeyes", "visrl"} <= black and "oracle-crop" not in white | black
