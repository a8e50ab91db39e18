"""ViCrop's layer per model: the demo model's travels with it, an unknown model gets the paper's rule, an explicit
layer wins, and `foveate vicrop calibrate --model DIR` records its choice where the next run finds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scripted import twin
from test_vicrop import QUESTION, scene
from typer.testing import CliRunner

from foveate.agents.state import FoveateContext
from foveate.agents.vicrop import build
from foveate.agents.vicrop_config import LAYER_FILE, calibrated_layer, home_layer_file, paper_layer, resolve_layer
from foveate.api import DEMO_MODEL_DIR
from foveate.cli import app
from foveate.policies.transformers_vlm import TransformersVLM
from foveate.tools.store import ImageStore


class Placed(TransformersVLM):
    """The tiny model, said to live in ``where`` (a directory with or without a calibration file)."""

    where: Path | None = None

    @property
    def model_dir(self) -> Path | None:
        return self.where

    def fingerprint(self) -> str:
        return f"placed:{self.where}"


def placed(tiny_policy, where: Path | None) -> Placed:
    policy = twin(Placed, tiny_policy)
    policy.where = where
    return policy


def test_the_demo_model_ships_its_calibrated_layer():
    recorded = json.loads((DEMO_MODEL_DIR / LAYER_FILE).read_text())
    assert recorded["layer"] == 1  # calibrated for v20 (the note in the file has the per-layer measurements)


def test_the_paper_rule_for_a_model_nobody_calibrated(tiny_policy, tmp_path):
    assert [paper_layer(n) for n in (32, 28, 3, 2, 1)] == [14, 12, 1, 1, 0]  # LLaVA-1.5-7B: 14 of 32
    unknown = placed(tiny_policy, tmp_path / "empty")
    assert calibrated_layer(unknown) is None
    assert resolve_layer(None, unknown) == paper_layer(tiny_policy.num_layers)  # no recorded layer


def test_a_layer_file_beside_the_weights_is_read_and_an_explicit_layer_wins(tiny_policy, tmp_path):
    (tmp_path / LAYER_FILE).write_text(json.dumps({"layer": 0}))
    policy = placed(tiny_policy, tmp_path)
    assert resolve_layer(None, policy) == 0
    assert resolve_layer(1, policy) == 1 and resolve_layer(-1, policy) == tiny_policy.num_layers - 1
    store = ImageStore(tmp_path / "images")
    context = FoveateContext(policy=policy, store=store, max_new_tokens=4)
    inputs = {"image": store.put(scene()), "question": QUESTION}
    for options, expected in (({}, 0), ({"layer": 1}, 1)):  # -o layer=1 (a build option) overrides the file
        state = build(**options).invoke(inputs, context=context)
        assert {s["layer"] for s in state["steps"] if s["kind"] == "map"} == {expected}
    (tmp_path / LAYER_FILE).write_text("{not json")
    with pytest.raises(Exception, match="cannot read the ViCrop layer"):
        resolve_layer(None, policy)


@pytest.mark.slow
def test_calibrate_records_the_layer_where_the_next_run_finds_it(tiny_model_dir, tmp_path, foveate_home):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    command = ["vicrop", "calibrate", "--model", str(model), "--task", "world:small-detail", "--n", "3"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "best layer" in result.output and "recorded in" in result.output
    recorded = json.loads((model / LAYER_FILE).read_text())
    assert recorded["method"] == "rel-att" and len(recorded["per_layer"]) == 2
    policy = TransformersVLM(model)
    assert resolve_layer(None, policy) == recorded["layer"]
    # a model whose directory cannot be written (here: it is gone): the record goes under $FOVEATE_HOME
    from foveate.agents.vicrop_config import record_layer

    gone = placed(policy, tmp_path / "missing" / "model")
    path = record_layer(gone, 1, {"method": "rel-att"})
    assert path == home_layer_file(gone) and path.is_relative_to(foveate_home)
    assert calibrated_layer(gone) == (1, path) and resolve_layer(None, gone) == 1
