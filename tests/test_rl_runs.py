"""Run plumbing of the RL recipes: typed configs from YAML, the run directory, metrics.jsonl and `foveate plot`."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from foveate.errors import FoveateError
from foveate.rl.deepeyes_grpo import GRPORecipe
from foveate.rl.plot import plot_run
from foveate.rl.runs import MetricsCallback, config_help, load_config, prepare_run_dir, read_metrics
from foveate.rl.visrl_dpo import DPORecipe


def test_every_config_field_has_help_text():
    for cls in (GRPORecipe, DPORecipe):
        lines = config_help(cls).splitlines()
        assert lines and all(line.split(": ", 1)[1].strip() for line in lines)


def test_shipped_configs_load_and_match_the_dataclasses():
    grpo = load_config(GRPORecipe, "configs/rl/deepeyes.yaml")
    assert grpo.max_tool_turns == 5 and grpo.beta == 0.0 and grpo.data == "world:zoom"
    dpo = load_config(DPORecipe, "configs/rl/visrl.yaml", {"max_steps": 3})
    assert dpo.beta == 0.1 and dpo.stage_steps() == (3, 3)
    assert load_config(DPORecipe, None).stage_steps() == (30, 30)
    assert DPORecipe().box_high == 0.8 and DPORecipe().box_low == 0.2  # VisRL's thresholds are the defaults


def test_bad_configs_fail_clearly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a list\n")
    with pytest.raises(FoveateError, match="mapping"):
        load_config(GRPORecipe, path)
    path.write_text("box_convention: resized\n")
    with pytest.raises(FoveateError, match="resized"):
        load_config(GRPORecipe, path)
    path.write_text("samples: 1\n")
    with pytest.raises(FoveateError, match="at least 2"):
        load_config(DPORecipe, path)
    with pytest.raises(FoveateError, match="cannot read"):
        load_config(GRPORecipe, tmp_path / "missing.yaml")


def test_run_directory_records_config_command_versions(tmp_path):
    recipe = load_config(GRPORecipe, None, {"max_steps": 7, "seed": 3})
    out = prepare_run_dir(tmp_path / "run", recipe, resume=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 7
    assert json.loads((out / "versions.json").read_text())["seed"] == 3
    assert (out / "command.txt").read_text().strip()
    (out / "checkpoint-1").mkdir()
    with pytest.raises(FoveateError, match="--resume"):
        prepare_run_dir(out, recipe, resume=False)
    prepare_run_dir(out, recipe, resume=True)


def test_metrics_and_plot(tmp_path):
    class State:
        is_world_process_zero = True
        global_step = 0

    callback = MetricsCallback(tmp_path, prefix="stage1")
    state = State()
    for step in range(1, 5):
        state.global_step = step
        logs = {"loss": 1.0 / step, "reward": step / 4, "tool_use_rate": step / 8, "learning_rate": 1e-5, "note": "x"}
        callback.on_log(None, state, None, logs=logs)
    callback.on_log(None, state, None, logs={"train_runtime": 3.0})
    with open(tmp_path / "metrics.jsonl", "a") as torn:
        torn.write('{"step": 5, "lo')  # a run killed mid-write
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4] and records[0]["stage"] == "stage1"
    written = plot_run(tmp_path)
    assert {p.name for p in written} == {"plot-reward.png", "plot-tools.png", "plot-loss.png", "plot-lr.png"}
    assert Image.open(tmp_path / "plot-reward.png").size[0] > 300


def run_main(args: list[str], capsys) -> tuple[int, str]:
    from foveate.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_plot_command_errors_are_one_line(tmp_path, capsys):
    code, err = run_main(["plot", str(tmp_path)], capsys)
    assert code == 2 and "no metrics.jsonl" in err and "Traceback" not in err


def test_train_command_rejects_unknown_settings(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("num_generationz: 4\n")
    code, err = run_main(["train", "grpo", "--config", str(path), "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown setting" in err
    code, err = run_main(["train", "dpo", "--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and ("config not found" in err or "cannot read" in err)


def test_resume_takes_the_last_complete_checkpoint_and_drops_one_cut_by_a_kill(tmp_path):
    from foveate.rl.ray_train import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step in (1, 2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"cut")  # killed before trainer_state.json
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")  # by step, not by name
    assert not (tmp_path / "checkpoint-10").exists() and (tmp_path / "checkpoint-1").is_dir()


def test_a_saved_model_keeps_the_notes_on_how_its_source_answers(tmp_path):
    """An RL run's model answers as its source did: the look-first recipe and ViCrop's layer come along."""
    import shutil

    from foveate.policies.factory import DEMO_MODEL_DIR
    from foveate.policies.look_first import looks_first
    from foveate.rl.runs import load_model_and_processor

    source = tmp_path / "source"
    shutil.copytree(DEMO_MODEL_DIR, source)
    _model, processor = load_model_and_processor(str(source))
    processor.save_pretrained(tmp_path / "saved")
    for name in ("foveate_recipe.json", "foveate_vicrop.json", "chat_template.jinja"):
        assert (tmp_path / "saved" / name).read_bytes() == (source / name).read_bytes()
    assert looks_first(tmp_path / "saved")
