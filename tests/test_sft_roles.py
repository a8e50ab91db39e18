"""World-derived role and program formats (rl/sft_roles.py): the exact prompts the agents send, the ideal replies.

A drift between a training format and its agent fails here: every ProReason trace is replayed through the real
`agents.proreason` graph by `TraceReplay`, a policy that answers only the prompts the trace holds (any other prompt
fails the test), so the agent must send exactly the trained prompts, in order, and end with the world's answer.
The replay stands in for the ideal trained model (the formats' own targets), which is what is being checked.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
from test_vpd_world import WorldFinder

from foveate.agents import get_builder
from foveate.agents.proreason_roles import VISION_SUFFIX, Dispatch, Reasoned, Summary, Verdict, parse_reply
from foveate.agents.state import FoveateContext
from foveate.agents.vpd import PROGRAM_PROMPT_TRAINED, extract_program
from foveate.config import parse_options
from foveate.errors import FoveateError
from foveate.eval.metrics import score_answer
from foveate.policies.base import ChatPolicy, ChatResult, Completion
from foveate.rl.sft_data import BUILDERS, ROW_FORMATS, DataMix, example_stream
from foveate.rl.sft_roles import program, proreason, role_trace, token_count
from foveate.rl.vpd_world import world_program
from foveate.tools.program import run_program
from foveate.tools.sandbox import check_program
from foveate.tools.store import ImageStore
from foveate.world import iter_items
from foveate.world.questions import referents

SCHEMAS = {"dispatch": Dispatch, "reasoning": Reasoned, "referee": Verdict, "summarize": Summary}
FAMILIES = ("attribute", "existence", "counting", "text", "relation", "comparison")


@pytest.fixture(scope="module")
def items() -> list:
    return list(iter_items(240, seed=5, preset="large"))


def by_family(items: list, per_family: int) -> dict[str, list]:
    grouped = defaultdict(list)
    for item in items:
        if len(grouped[item[2]["family"]]) < per_family:
            grouped[item[2]["family"]].append(item)
    assert set(grouped) >= set(FAMILIES)
    return grouped


def prompt_key(conversation: list[dict]) -> tuple[bool, str]:
    """(whether the last user turn has an image, its text)."""
    content = conversation[-1]["content"]
    if isinstance(content, str):
        return False, content
    return any(p["type"] == "image" for p in content), "".join(p["text"] for p in content if p["type"] == "text")


class TraceReplay(ChatPolicy):
    """Answers exactly the prompts of a trace's turns with their targets; any other prompt fails the test."""

    name = "trace-replay"

    def __init__(self, turns: list[dict]) -> None:
        self.replies = {prompt_key(turn["messages"][:1]): turn["messages"][1]["content"] for turn in turns}
        self.asked: list[tuple[bool, str]] = []

    def chat(self, conversations, params=None):
        results = []
        for conversation in conversations:
            key = prompt_key(conversation)
            self.asked.append(key)
            assert key in self.replies, f"the agent sent a prompt no training example has: {key}"
            text = self.replies[key]
            results.append(ChatResult([Completion(text, len(text.split()))], 0, 0.0, self.name))
        return results


def test_every_family_gets_a_trace_whose_role_replies_validate_and_answer_right(items) -> None:
    seen = Counter()
    for image, scene, row in items:
        trace = role_trace(image, row, scene)
        assert trace is not None, row["question"]
        two_step = row["family"] in ("relation", "comparison")
        assert [t["role"] for t in trace] == (
            ["dispatch", "vision", "vision", "referee", "dispatch", "reasoning", "referee", "summarize"]
            if two_step
            else ["dispatch", "vision", "referee", "summarize"]
        )
        for turn in trace:
            seen[(row["family"], turn["role"])] += 1
            user, reply = turn["messages"]
            if turn["role"] == "vision":  # the eyesight: the image, then the sub-question "step by step"
                assert [p["type"] for p in user["content"]] == ["image", "text"] and user["content"][0][
                    "image"
                ] is image
                assert user["content"][1]["text"].endswith(VISION_SUFFIX) and turn["scene"] is scene
                assert turn["evidence"] == row["boxes"] if not two_step else len(turn["evidence"]) == 1
                assert isinstance(reply["content"], str) and reply["content"]
                continue
            assert isinstance(user["content"], str) and turn["scene"] is None  # wisdom is blind
            value = parse_reply(reply["content"], SCHEMAS[turn["role"]])
            if turn["role"] in ("summarize", "reasoning"):
                assert score_answer(value.answer, row, image.size)["score"] == 1.0, (row["question"], value)
        dispatch = parse_reply(trace[0]["messages"][1]["content"], Dispatch)
        assert dispatch.expert == "vision"
        if two_step:  # one sub-question per referent, each naming it
            phrases = referents(row["question"])
            assert len(dispatch.sub_questions) == 2
            assert all(phrase in q for q, phrase in zip(dispatch.sub_questions, phrases, strict=True))
        else:
            assert dispatch.sub_questions == [row["question"]]
    assert {family for family, _ in seen} == set(FAMILIES)
    assert all(seen[(family, "reasoning")] for family in ("relation", "comparison"))


def test_grounding_and_caption_rows_have_no_role_or_program_example() -> None:
    row = {"question": "Describe the image in detail.", "answers": ["x"], "family": "caption", "subtype": "dense"}
    assert role_trace(None, row, None) is None and program(row=row) is None
    assert proreason(image=None, row=row, scene=None, rng=random.Random(0)) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_proreason_agent_replays_the_trace_to_the_worlds_answer(family, items, tmp_path) -> None:
    for image, scene, row in by_family(items, 2)[family]:
        trace = role_trace(image, row, scene)
        eyes = TraceReplay([t for t in trace if t["role"] == "vision"])
        wisdom = TraceReplay([t for t in trace if t["role"] != "vision"])
        store = ImageStore(tmp_path)
        context = FoveateContext(policy=eyes, wisdom=wisdom, store=store, max_new_tokens=64)
        state = get_builder("proreason")().invoke(
            {"image": store.put(image), "question": row["question"]}, context=context
        )
        assert state["answer"] == row["answers"][0] and state["parse_failures"] == 0
        assert state["rounds"] == (2 if family in ("relation", "comparison") else 1)
        # Every trained turn was asked, exactly once, and the wisdom never saw an image.
        assert sorted(eyes.asked) == sorted(eyes.replies) and all(has_image for has_image, _ in eyes.asked)
        assert sorted(wisdom.asked) == sorted(wisdom.replies) and not any(has_image for has_image, _ in wisdom.asked)


def test_programs_are_the_trained_prompt_and_run_to_the_worlds_answer(items) -> None:
    needs_vlm, answered = Counter(), Counter()
    for family, rows in by_family(items, 10).items():
        for image, scene, row in rows:
            example = program(row=row)
            user, reply = example["messages"]
            assert user["content"] == PROGRAM_PROMPT_TRAINED.format(question=row["question"])
            source = extract_program(reply["content"])
            assert source == world_program(row["question"]) and example["scene"] is None
            check_program(source)
            if family == "text":  # OCR (PP-OCRv4) reads the label: covered by tests/test_vpd_world.py
                assert ".ocr()" in source
                continue
            result = run_program(source, image, grounder=WorldFinder(scene))
            if "simple_query" in source and (family in ("attribute",) or "same" in row["question"]):
                # Reading a colour or shape needs the VLM: without one the program fails with a clear error.
                assert not result.ok and "needs a vision-language model" in result.error
                needs_vlm[family] += 1
            elif "marked" not in row["question"]:  # the exact finder knows no labels
                assert result.ok, (row["question"], result.error)
                assert score_answer(result.answer, row, image.size)["score"] == 1.0, (row["question"], result.answer)
                answered[family] += 1
    assert needs_vlm["attribute"] and all(answered[f] for f in ("existence", "counting", "relation", "comparison"))


def test_the_vpd_agent_sends_the_trained_programmer_prompt(items, tiny_policy, tmp_path) -> None:
    image, scene, row = by_family(items, 1)["counting"][0]
    example = program(row=row)
    programmer = TraceReplay([example])
    store = ImageStore(tmp_path)
    context = FoveateContext(policy=tiny_policy, wisdom=programmer, store=store, max_new_tokens=8)
    graph = get_builder("vpd", {"k": 1, "api_doc": False})()
    state = graph.invoke({"image": store.put(image), "question": row["question"]}, context=context)
    assert programmer.asked == [(False, example["messages"][0]["content"])]
    assert state["programs"] == [example["messages"][1]["content"]]
    with pytest.raises(FoveateError, match="api_doc"):
        get_builder("vpd", {"api_doc": "off"})()
    assert get_builder("vpd", parse_options(["api_doc=false"]))  # the command line's -o api_doc=false is a bool


def test_the_stream_draws_role_and_program_examples_under_the_collators_length() -> None:
    from foveate.policies.factory import DEMO_MODEL_DIR
    from foveate.policies.loading import load_processor

    assert {"proreason", "program"} <= set(BUILDERS) and {"proreason", "program"} <= ROW_FORMATS
    mix = DataMix(formats={"proreason": 1.0, "program": 1.0})
    stream = example_stream(3, mix)
    examples = [next(stream) for _ in range(60)]
    assert {e["format"] for e in examples} == {"proreason", "program"}
    roles = Counter(e.get("role") for e in examples if e["format"] == "proreason")
    assert {"dispatch", "vision", "referee", "summarize"} <= set(roles)
    for example in examples:
        has_image = not isinstance(example["messages"][0]["content"], str)
        # Text-only turns carry no scene and no evidence: the vision losses must not label another example's image.
        assert (example["scene"] is not None) == has_image and (has_image or example["evidence"] == [])
    processor = load_processor(DEMO_MODEL_DIR)
    lengths = [token_count(processor, example) for example in examples]
    assert max(lengths) < 512, max(lengths)  # rl.sft.TrainConfig.max_length: nothing of a target is cut


def test_the_collator_trains_text_only_turns_beside_image_ones_with_the_vision_losses_on() -> None:
    """A batch ending in text-only turns, through the real collator with both vision losses' targets: it builds,
    nothing is truncated, and each row's labels are exactly its reply (the text-only rows label no image)."""
    from foveate.policies.factory import DEMO_MODEL_DIR
    from foveate.policies.loading import load_processor
    from foveate.rl.sft import ChatCollator

    stream = example_stream(4, DataMix(formats={"proreason": 1.0, "program": 1.0, "qa": 1.0}))
    examples = [next(stream) for _ in range(12)]
    examples.sort(key=lambda e: isinstance(e["messages"][0]["content"], str))  # image examples first, text last
    assert isinstance(examples[-1]["messages"][0]["content"], str) and examples[-1]["scene"] is None
    collator = ChatCollator(load_processor(DEMO_MODEL_DIR), max_length=512, aux_targets=True, attn_targets=True)
    batch = collator(examples)
    assert batch["input_ids"].shape[1] < 512 and "aux_color" in batch
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert collator.tokenizer.decode(labelled) == example["messages"][-1]["content"] + "<|im_end|>"


def test_vpd_sends_the_api_reference_unless_the_programmer_was_trained_on_programs(tiny_model_dir, tmp_path) -> None:
    """``api_doc="auto"`` (the default) reads the recipe saved beside a white-box programmer's weights: trained on
    the ``program`` format → the trained prompt; no recipe, another recipe, or a black-box policy → the reference."""
    import json
    import shutil

    from foveate.agents.vpd import sends_api_doc
    from foveate.policies.transformers_vlm import TransformersVLM

    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    recipe = {"data": {"formats": {"qa": 1.0}}, "stages": [{"data": {"formats": {"qa": 1.0, "program": 2.0}}}]}
    (trained / "foveate_recipe.json").write_text(json.dumps(recipe))

    def auto(directory):
        policy = TransformersVLM(directory)
        try:
            return sends_api_doc(policy, "auto"), sends_api_doc(policy, True), sends_api_doc(policy, False)
        finally:
            policy.close()

    assert auto(trained) == (False, True, False)
    recipe["stages"][0]["data"]["formats"]["program"] = 0.0
    (trained / "foveate_recipe.json").write_text(json.dumps(recipe))
    assert auto(trained) == (True, True, False)
    assert auto(tiny_model_dir) == (True, True, False)  # no saved recipe: a real checkpoint
    assert sends_api_doc(TraceReplay([]), "auto") is True
