"""The shipped demo VLM (foveate/assets/models/demo): a plain Qwen2-VL directory that the Auto classes load, small
enough to ship, and the default model that answers the README's main command right."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from foveate.api import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
README_IMAGE = "examples/world/images/large-7-000002.png"
README_QUESTION = "What color is the medium-sized square?"


def test_the_demo_model_loads_through_the_auto_classes_from_its_directory() -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    weights = DEMO_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 30 * 1024 * 1024  # issue 3: at most 30 MB in the repository
    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR)
    # AutoProcessor, or its image processor alone where torchvision (which the video processor needs) is missing.
    processor = load_processor(DEMO_MODEL_DIR)
    assert model.config.model_type == "qwen2_vl" and model.dtype == torch.float16  # as saved (save_dtype)
    # The processor sees a 672-px scene at 336 px at most: tiny objects are illegible until cropped.
    assert processor.image_processor.size["longest_edge"] == 336 * 336


def test_the_shipped_model_was_built_by_the_documented_recipe() -> None:
    from foveate.rl.sft import load_recipe

    # Written by the training run itself (rl.sft): every stage's model, data and train settings as run. Read back
    # through load_recipe (JSON is YAML), so a setting added to the recipe since then counts as its default.
    def settings(path: Path) -> dict:
        return json.loads(json.dumps(asdict(load_recipe(path)), default=list))

    shipped = settings(DEMO_MODEL_DIR / "foveate_recipe.json")
    documented = settings(ROOT / "configs" / "demo.yaml")
    # The output directory is where that run wrote it before the files were copied here; nothing else may differ.
    assert {**shipped, "output_dir": None} == {**documented, "output_dir": None}


def test_the_readme_main_command_answers_its_example_right() -> None:
    from foveate import ask

    tasks = [json.loads(line) for line in (ROOT / "examples" / "world" / "tasks.jsonl").read_text().splitlines()]
    task = next(t for t in tasks if t["question"] == README_QUESTION and README_IMAGE.endswith(t["image"]))
    readme = (ROOT / "README.md").read_text()
    assert README_QUESTION in readme and README_IMAGE in readme
    result = ask(str(ROOT / README_IMAGE), README_QUESTION)  # no model given: the demo model
    assert result.trace.model_calls and result.answer == task["answers"][0]


def test_the_readmes_commands_name_images_that_ship_and_write_nothing_into_the_checkout() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"foveate (?:ask|chat) (\S+\.(?:png|jpg|jpeg))", readme)
    assert len(images) >= 4 and all((ROOT / image).is_file() for image in images), images
    traces = re.findall(r"--trace (\S+)", readme)
    assert traces and all(t.startswith("/tmp/") or t.startswith("out.") for t in traces), traces
