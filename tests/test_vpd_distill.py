"""VPD distillation data (rl/vpd_distill.py, `foveate vpd distill`): programs → executions → verification against
labels → rationales → TRL conversational SFT rows that TRL's vision collator reads.

The programmer/rewriter is a scripted `FunctionPolicy` behind the OpenAI-compatible test server on loopback (a
stand-in for a remote code LLM, which cannot run here); the eyesight is the real tiny model. ``find`` uses a
grounder that reads the world's exact boxes: these tests are about the data machinery, not grounding quality.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from openai_server import FunctionPolicy, make_app, serve_in_thread

from foveate.eval.runner import load_eval_tasks
from foveate.policies.openai_http import OpenAIChatPolicy
from foveate.rl.vpd_distill import ANSWER_SUFFIX, RATIONALE_SUFFIX, distill, template_rationale, write_rows
from foveate.tools.boxes import Box
from foveate.tools.grounding import Grounding
from foveate.tools.images import load_image

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "examples" / "world"
EXISTS = re.compile(r"Question: Is there an? (\w+ \w+) in the image\?")


def digest(image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


class SceneGrounder:
    """The world's ground truth by image: objects whose "color shape" matches the phrase (whole images only)."""

    def __init__(self) -> None:
        self.scenes = {}
        for line in (WORLD / "scenes.jsonl").read_text().splitlines():
            scene = json.loads(line)
            self.scenes[digest(load_image(WORLD / scene["image"]))] = scene["objects"]

    def ground(self, image, phrases):
        objects = self.scenes[digest(image)]
        out = []
        for phrase in phrases:
            color, shape = phrase.split()
            found = [o for o in objects if (o["color"], o["shape"]) == (color, shape)]
            out.append([Grounding(Box(*o["box"]), 1.0, phrase) for o in found])
        return out


def programmer_reply(conversation: list[dict], index: int) -> str:
    """Sample 0 is wrong for every question; sample 1 answers existence questions right; the rewrite of the yellow
    question does not state the answer (so the template replaces it)."""
    prompt = conversation[-1]["content"]
    if prompt.startswith("Question:") and "A program answered it" in prompt:
        if "yellow square" in prompt:
            return "I looked but cannot say."
        return "There is no red square. So the answer is no." if "red square" in prompt else "A blue triangle. So yes."
    match = EXISTS.search(prompt)
    if index == 0 or match is None:
        return "```python\ndef execute_command(image_patch):\n    return 'maybe'\n```"
    return f"def execute_command(image_patch):\n    return bool_to_yesno(image_patch.exists({match.group(1)!r}))\n"


@pytest.fixture(scope="module")
def distilled(tiny_policy):
    rows = load_eval_tasks(WORLD / "tasks.jsonl")
    programmer = FunctionPolicy(programmer_reply)
    with serve_in_thread(make_app(programmer, "coder")) as url:
        out, stats = distill(rows, OpenAIChatPolicy(url, "coder"), tiny_policy, k=2, grounder=SceneGrounder())
    return rows, out, stats, programmer


def test_programs_are_verified_against_the_labels_and_unverified_items_dropped(distilled):
    rows, out, stats, programmer = distilled
    existence = [r for r in rows if r["family"] == "existence"]
    assert stats.items == 6 and stats.kept == len(existence) == 3 and stats.dropped == 3
    assert stats.programs_run == 2 * 6 - 0 and stats.programs_ok == 3  # each item: wrong sample, then the right
    program_calls = [seen for seen in programmer.seen if "class ImagePatch" in seen[0][0]["content"]]
    assert len(program_calls) == 6 and all(n == 2 for _, n in program_calls)  # one batched call: 6 prompts, n=2
    answers = {row["id"]: row["answers"][0] for row in existence}
    assert {r["id"]: r["completion"][0]["content"][0]["text"] for r in out if r["task"] == "answer"} == answers


def test_rationales_keep_the_grounding_and_end_with_the_answer(distilled):
    _, out, stats, _ = distilled
    rationales = {r["id"]: r["completion"][0]["content"][0]["text"] for r in out if r["task"] == "rationale"}
    assert stats.llm_rationales == 2 and stats.template_rationales == 1
    assert rationales["large-7-000000-q0"] == "A blue triangle. So yes."
    assert rationales["large-7-000001-q1"] == "There is no red square. So the answer is no."
    # The yellow square's rewrite lacked the answer: the template states the logged call and its boxes.
    assert rationales["large-7-000002-q1"].startswith("Looking for yellow square, I found 1 at [")
    assert rationales["large-7-000002-q1"].endswith("So the answer is yes.")
    for row in out:
        suffix = ANSWER_SUFFIX if row["task"] == "answer" else RATIONALE_SUFFIX
        assert row["prompt"][0]["content"][1]["text"].endswith(suffix)
        assert json.loads(row["execution"])[0]["name"] == "find"


def test_rows_load_in_trl_and_its_vision_collator_tokenises_them(distilled, tiny_model_dir, tmp_path):
    from datasets import Image, Sequence, load_dataset
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from foveate.policies.loading import load_processor

    _, out, _, _ = distilled
    path = write_rows(out, tmp_path / "sft.jsonl")
    dataset = load_dataset("json", data_files=str(path), split="train").cast_column("images", Sequence(Image()))
    assert len(dataset) == 6 and dataset[0]["images"][0].size == (672, 672)
    collator = DataCollatorForVisionLanguageModeling(load_processor(tiny_model_dir), completion_only_loss=True)
    batch = collator([dataset[i] for i in range(2)])
    assert {"input_ids", "labels", "pixel_values", "image_grid_thw"} <= set(batch)
    # Only the completion is trained on: the answer row's labels are its answer and the end of turn.
    answer_row = next(i for i in range(2) if dataset[i]["task"] == "answer")
    labels = batch["labels"][answer_row]
    trained = load_processor(tiny_model_dir).tokenizer.decode(labels[labels != -100])
    assert trained.strip().startswith(dataset[answer_row]["completion"][0]["content"][0]["text"])


def test_template_rationale_states_every_model_call() -> None:
    log = [
        {"name": "find", "args": {"name": "bus"}, "result": [[1, 2, 3, 4], [5, 6, 7, 8]], "boxes": [[0, 0, 9, 9]]},
        {"name": "simple_query", "args": {"question": "What color?"}, "result": "red", "boxes": [[1, 2, 3, 4]]},
        {"name": "ocr", "args": {}, "result": "AB", "boxes": [[0, 0, 9, 9], [1, 1, 2, 2]]},
        {"name": "crop", "args": {"box": [0, 0, 1, 1]}, "result": [0, 0, 1, 1], "boxes": []},
        {"name": "simple_query", "args": {"question": "x"}, "error": "simple_query: failed", "boxes": []},
    ]
    assert template_rationale(log, "2") == (
        "Looking for bus, I found 2 at [1, 2, 3, 4], [5, 6, 7, 8]. Asked 'What color?' about [1, 2, 3, 4], the "
        "answer is 'red'. The text in [0, 0, 9, 9] reads 'AB'. So the answer is 2."
    )


@pytest.mark.slow
def test_vpd_distill_command_writes_rows_and_prints_its_counts(tiny_model_dir, tmp_path, capsys):
    """The command wired end to end: scripted programmer over HTTP, the tiny model as eyesight (its attention
    grounds ``find``), the example tasks; whatever it verifies becomes two rows per item."""
    from foveate.cli import main

    out = tmp_path / "sft.jsonl"
    with serve_in_thread(make_app(FunctionPolicy(programmer_reply), "coder")) as url:
        argv = ["vpd", "distill", "--task", str(WORLD / "tasks.jsonl"), "--out", str(out), "--k", "2"]
        main([*argv, "--model", str(tiny_model_dir), "--wisdom-endpoint", url, "--wisdom-model", "coder"])
    counts = json.loads(capsys.readouterr().out)
    assert counts["items"] == 6 and counts["programs_run"] == 12 and counts["kept"] + counts["dropped"] == 6
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["rows"] == len(rows) == 2 * counts["kept"]


def test_sft_rows_that_trl_cannot_use_are_refused_clearly(tmp_path):
    from foveate.errors import FoveateError
    from foveate.rl.trl_sft import load_rows

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no images"}\n')
    with pytest.raises(FoveateError, match="rows need 'images'"):
        load_rows(bad)
    with pytest.raises(FoveateError, match="not found"):
        load_rows(tmp_path / "missing.jsonl")
    bad.write_text("{not json\n")
    with pytest.raises(FoveateError, match="cannot read SFT rows"):
        load_rows(bad)


@pytest.mark.slow
def test_train_sft_on_distilled_rows_with_trl(distilled, tiny_model_dir, tmp_path, capsys):
    """`foveate train sft --data` runs TRL's SFTTrainer on the distilled rows; the result loads and answers."""
    from foveate.cli import main
    from foveate.policies.transformers_vlm import TransformersVLM

    _, out, _, _ = distilled
    data = write_rows(out, tmp_path / "sft.jsonl")
    target = tmp_path / "vpd-model"
    main(["train", "sft", "--data", str(data), "--init-from", str(tiny_model_dir), "--output-dir", str(target),
          "--max-steps", "2"])  # fmt: skip
    assert f"model written to {target}" in capsys.readouterr().out
    losses = json.loads((target / "training_log.json").read_text())
    assert losses[-1]["step"] == 2 and all(entry["loss"] > 0 for entry in losses)
    policy = TransformersVLM(target)
    image = load_image(WORLD / "images" / "large-7-000000.png")
    reply = policy.chat_one(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}]
    )
    assert isinstance(reply.text, str) and not (target / "checkpoints").exists()


def test_world_programs_need_no_programmer_and_rationales_fall_back_to_templates(tiny_policy):
    rows = load_eval_tasks(WORLD / "tasks.jsonl")
    out, stats = distill(rows, None, tiny_policy, world_programs=True, grounder=SceneGrounder())
    assert stats.programs_run == 6 and stats.llm_rationales == 0 and stats.template_rationales == stats.kept
    kept = {row["id"] for row in out}
    # Exact grounding answers existence and the relation; reading a colour or shape is the tiny model's job.
    assert {"large-7-000000-q0", "large-7-000001-q1", "large-7-000002-q1", "large-7-000001-q0"} <= kept
    relation = next(r for r in out if r["id"] == "large-7-000001-q0" and r["task"] == "rationale")
    text = relation["completion"][0]["content"][0]["text"]
    assert text.startswith("Looking for black hexagon, I found 1 at [") and text.endswith("So the answer is no.")
