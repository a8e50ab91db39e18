"""Patch Matters (agents/patch_matters.py): divide rules on exact boxes, sample grouping on hand-written sentences
with the real MiniLM embeddings, the merges, and the whole strategy on the real tiny model (and the demo model,
slow)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scripted import twin

from foveate.agents.patch_matters import SCORE_BATCH
from foveate.agents.patch_matters_parts import (
    claim,
    divide,
    group_samples,
    inside_fraction,
    join_sentences,
    merge_overlapping,
    new_sentences,
    object_phrases,
    region_name,
    select_sentences,
)
from foveate.errors import FoveateError
from foveate.tools.boxes import Box
from foveate.tools.sentences import default_embedder, split_sentences

FULL = (200, 100)  # width, height: quadrants are 100 x 50


# ---- divide -------------------------------------------------------------------------------------------------
def test_quadrants_without_boxes_tile_the_image() -> None:
    patches = divide(FULL, [])
    assert [p.name for p in patches] == ["top-left", "top-right", "bottom-left", "bottom-right"]
    assert [p.box.to_list() for p in patches] == [
        [0, 0, 100, 50],
        [100, 0, 200, 50],
        [0, 50, 100, 100],
        [100, 50, 200, 100],
    ]


def test_a_box_more_than_30_percent_inside_enlarges_its_quadrant_and_no_other() -> None:
    box = Box(80, 20, 110, 40)  # 600 px²: 400 inside top-left (67 %), 200 inside top-right (33 %)
    patches = divide(FULL, [box])
    assert patches[0].box == Box(0, 0, 110, 50) and patches[0].enlarged_by == (0,)
    assert patches[1].box == Box(80, 0, 200, 50) and patches[1].enlarged_by == (0,)
    assert patches[2].box == Box(0, 50, 100, 100) and patches[3].box == Box(100, 50, 200, 100)


def test_exactly_30_percent_inside_does_not_enlarge() -> None:
    exact = Box(97, 0, 107, 10)  # 100 px²: 3x10 = 30 inside top-left (exactly 30 %), 70 inside top-right
    assert inside_fraction(exact, Box(0, 0, 100, 50)) == pytest.approx(0.3)
    patches = divide(FULL, [exact])
    assert patches[0].box == Box(0, 0, 100, 50) and patches[0].enlarged_by == ()  # not MORE than 30 %
    assert patches[1].box == Box(97, 0, 200, 50) and patches[1].enlarged_by == (0,)
    above = Box(96.9, 0, 106.9, 10)  # 31 % inside top-left
    assert divide(FULL, [above])[0].box == Box(0, 0, 106.9, 50)


def test_enlargement_is_one_pass_over_the_original_quadrant() -> None:
    a = Box(90, 10, 130, 20)  # 25 % in top-left: does not enlarge it
    b = Box(40, 10, 95, 20)  # all inside top-left: enlarges it to x2 = 95, which would now hold 5/40 of a: irrelevant
    assert divide(FULL, [a, b])[0].box == Box(0, 0, 100, 50) and divide(FULL, [a, b])[0].enlarged_by == (1,)


def test_main_box_is_added_only_when_its_iou_with_the_image_is_below_0_4() -> None:
    small = [Box(10, 10, 30, 30), Box(50, 20, 70, 40)]  # union 60x30 = 1800 / 20000 = 0.09
    patches = divide(FULL, small, small)
    assert patches[-1].name == "main" and patches[-1].box == Box(10, 10, 70, 40)
    large = [Box(0, 0, 160, 50)]  # union 8000 / 20000 = 0.4: not below 0.4
    assert [p.name for p in divide(FULL, large, large)][-1] == "bottom-right"
    just_below = [Box(0, 0, 159, 50)]  # 7950 / 20000 = 0.3975
    assert divide(FULL, just_below, just_below)[-1].name == "main"


def test_region_names() -> None:
    assert region_name(Box(0, 0, 50, 30), FULL) == "top-left"
    assert region_name(Box(80, 40, 120, 60), FULL) == "centre"
    assert region_name(Box(150, 40, 200, 60), FULL) == "right"


# ---- phrases, grouping, selection, merges -------------------------------------------------------------------
def test_object_phrases_from_a_world_caption() -> None:
    caption = (
        "A 672x672 image with a plain beige background. It shows 3 objects: a large red circle in the top left, "
        'with "K" written on it; a tiny blue star at the bottom; the red circle is above the blue star.'
    )
    assert object_phrases(split_sentences(caption)) == ["large red circle", "tiny blue star", "red circle"]
    assert object_phrases(split_sentences(caption), limit=1) == ["large red circle"]


def test_grouping_similar_contradictory_and_unique_with_minilm() -> None:
    samples = [
        ["a large red circle in the top left", "a tiny blue star at the bottom", "a green hexagon on the right"],
        ["a large red circle at the top", "a tiny yellow star at the bottom"],
        ["a large red circle in the top left", "a purple cross next to a label"],
    ]
    grouping = group_samples(samples, default_embedder().embed)
    # the red circle: all three samples agree (cosine >= 0.9 to the first) -> one similar sentence
    assert grouping.similar == ["a large red circle in the top left"]
    # the star: same topic, another colour in sample 1 -> one contradictory group with both alternatives
    assert grouping.contradictory == [["a tiny blue star at the bottom", "a tiny yellow star at the bottom"]]
    assert sorted(grouping.unique) == ["a green hexagon on the right", "a purple cross next to a label"]
    kinds = sorted(d["kind"] for d in grouping.decisions)
    assert kinds == ["contradictory", "similar", "unique", "unique"]
    assert set(grouping.doubtful()) == {*grouping.contradictory[0], *grouping.unique}


def test_one_sample_never_agrees_with_itself() -> None:
    grouping = group_samples([["a red circle", "a red circle"], ["a blue square"]], default_embedder().embed)
    assert grouping.similar == [] and "a red circle" in grouping.unique


def test_selection_keeps_agreed_best_contradictory_and_unique_above_threshold() -> None:
    blue, yellow, cross = "a tiny blue star at the bottom", "a tiny yellow star at the bottom", "a green cross"
    grouping = group_samples([["a red circle", blue, cross], ["a red circle", yellow]], default_embedder().embed)
    assert grouping.contradictory == [[blue, yellow]] and grouping.unique == [cross]
    scores = {blue: 0.2, yellow: 0.6, cross: 0.3}
    assert select_sentences(grouping, scores, keep=0.3) == ["a red circle", yellow]  # 0.3 is not above 0.3
    assert select_sentences(grouping, {**scores, cross: 0.31}) == ["a red circle", yellow, cross]
    assert select_sentences(grouping, {blue: 0.25, yellow: 0.1}) == ["a red circle"]  # best alternative too low


def test_neighbour_merge_groups_by_iou_above_threshold() -> None:
    a, b, c = Box(0, 0, 10, 10), Box(3, 0, 13, 10), Box(5, 0, 15, 10)  # IoU(a,b)=7/13, (b,c)=8/12, (a,c)=5/15
    assert merge_overlapping([(a, []), (b, []), (c, [])], 0.4) == [[0, 1, 2]]  # chained through b
    assert merge_overlapping([(a, []), (c, [])], 0.4) == [[0], [1]]
    assert merge_overlapping([], 0.4) == []


def test_new_sentences_drop_duplicates_of_the_caption_and_of_each_other() -> None:
    known = ["a large red circle in the top left"]
    candidates = ["a large red circle at the bottom right", "a tiny green star", "a tiny green star on the left"]
    kept = new_sentences(candidates, known, default_embedder().embed, duplicate=0.9)
    assert [text for text, _ in kept] == ["a tiny green star"]
    assert join_sentences(["a tiny green star", "two squares."]) == "A tiny green star; two squares."


def test_the_claim_asked_of_a_crop_is_the_object_a_sentence_names() -> None:
    assert claim('A medium yellow star in the bottom right, with "C" written on it') == "a medium yellow star"
    assert claim("an orange hexagon at the top") == "an orange hexagon"
    assert claim("It shows 3 objects") == "it shows 3 objects"  # names no object: asked as it is
    assert claim("") == ""


# ---- the whole strategy -------------------------------------------------------------------------------------
def Counting(policy):  # noqa: N802 (reads as the class it builds)
    """The real transformers policy (still a `WhiteBoxPolicy`, via `scripted.twin`), counting its chat calls (how
    many, how many conversations, n) and the rows it scores — not a stand-in."""
    base = type(policy)

    class CountingPolicy(base):
        def chat(self, conversations, params=None):
            self.calls.append((len(conversations), params.n if params else 1, params.temperature if params else 0.0))
            return base.chat(self, conversations, params)

        def answer_logprobs(self, conversations, answers):
            self.scored += len(conversations)
            return base.answer_logprobs(self, conversations, answers)

        def choice_logprobs(self, conversations, choices):
            self.scored += len(conversations)
            self.score_calls.append(len(conversations))
            return base.choice_logprobs(self, conversations, choices)

    counting = twin(CountingPolicy, policy)
    counting.calls, counting.scored, counting.score_calls = [], 0, []
    return counting


def _scene() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))


def _run(policy, **options):
    from foveate.agents import get_builder
    from foveate.api import run_strategy
    from foveate.tools.store import ImageStore

    store = ImageStore()
    graph = get_builder("patch-matters", {"caption_tokens": 24, **options})()
    inputs = {"image": store.put(_scene()), "question": "Describe the image in detail."}
    return run_strategy(graph, inputs, strategy="patch-matters", policy=policy, store=store, max_new_tokens=24)


def test_the_strategy_on_the_tiny_model_batches_patches_and_traces_every_step(tiny_policy) -> None:
    policy = Counting(tiny_policy)
    result = _run(policy)
    steps = result.trace.steps
    patches = [s for s in steps if s["kind"] == "crop"]
    assert 4 <= len(patches) <= 5 and patches[0]["box"][:2] == [0, 0]
    # one global greedy call, then ONE call for every patch with n = 3 samples at temperature 0.7
    assert policy.calls[0] == (1, 1, 0.0) and policy.calls[1] == (len(patches), 3, 0.7) and len(policy.calls) == 2
    patch_calls = [s for s in steps if s["kind"] == "model_call" and s["node"] == "caption_patches"]
    assert len(patch_calls) == len(patches) and all(len(s["outputs"]) == 3 for s in patch_calls)
    assert [s["box"] for s in patch_calls] == [s["box"] for s in patches]  # patch i's samples are conversation i's
    grounding = next(s for s in steps if s["kind"] == "tool_call" and s["name"] == "grounding")
    assert grounding["arguments"]["grounder"] == "AttentionGrounder"
    groups = [s for s in steps if s["kind"] == "tool_call" and s["name"] == "group_samples"]
    assert len(groups) == len(patches) and all(g["arguments"]["scorer"] == "likelihood" for g in groups)
    # every scored sentence of every patch in as few calls as the batch bound allows (one row per sentence)
    assert len(policy.score_calls) == -(-policy.scored // SCORE_BATCH)
    assert [s["name"] for s in steps if s["kind"] == "tool_call"][-2:] == ["merge_patches", "merge_global"]
    global_caption = steps[0]["outputs"][0]
    assert result.answer.startswith(global_caption.strip()[:10]) and steps[-1]["kind"] == "answer"


def test_black_box_options_and_an_llm_merge(tiny_policy) -> None:
    policy = Counting(tiny_policy)
    result = _run(policy, grounder="vlm", scorer="embedding", merge_model="self", samples=2)
    grounding = next(s for s in result.trace.steps if s.get("name") == "grounding")
    assert grounding["arguments"]["grounder"] in ("VLMGrounder", "none")
    merges = [s for s in result.trace.steps if s["kind"] == "model_call" and s["node"] == "merge"]
    assert merges and merges[-1]["merged"] == "global" and result.answer  # the LLM's merge is the answer
    assert any(call[1] == 2 for call in policy.calls)


def test_agreement_only_scores_nothing_and_adds_only_agreed_sentences(tiny_policy) -> None:
    policy = Counting(tiny_policy)
    result = _run(policy, keep=1.0)
    groups = [s for s in result.trace.steps if s.get("name") == "group_samples"]
    assert groups and all(g["arguments"]["scorer"] == "none" for g in groups)
    assert getattr(policy, "scored", 0) == 0  # no scoring call at all
    agreed = {d["sentences"][0] for g in groups for d in g["arguments"]["groups"] if d["kind"] == "similar"}
    added = next(s for s in result.trace.steps if s.get("name") == "merge_global")["arguments"]["added"]
    assert all(text in agreed for region in added for text, _ in region["sentences"])


def test_unknown_or_invalid_options_fail_before_running() -> None:
    from foveate.agents import get_builder

    with pytest.raises(FoveateError, match="no option bogus"):
        get_builder("patch-matters", {"bogus": 1})()
    with pytest.raises(FoveateError, match="grounder must be one of"):
        get_builder("patch-matters", {"grounder": "sonar"})()


@pytest.mark.slow
def test_the_strategy_on_the_demo_model_adds_region_sentences() -> None:
    from foveate.agents import get_builder
    from foveate.api import DEMO_MODEL_DIR, run_strategy
    from foveate.policies.transformers_vlm import TransformersVLM
    from foveate.tools.images import load_image
    from foveate.tools.store import ImageStore

    policy, store = TransformersVLM(DEMO_MODEL_DIR), ImageStore()
    image = store.put(load_image("examples/world/images/large-7-000002.png"))
    graph = get_builder("patch-matters")()
    result = run_strategy(
        graph,
        {"image": image, "question": "Describe the image in detail."},
        strategy="patch-matters",
        policy=policy,
        store=store,
        max_new_tokens=160,
    )
    global_caption = result.trace.steps[0]["outputs"][0]
    assert result.answer.startswith(global_caption) and len(result.answer) > len(global_caption)
    assert "In the " in result.answer  # at least one region added sentences the global caption lacked


def test_sentences_naming_one_object_on_one_crop_are_asked_once(tiny_policy) -> None:
    from foveate.agents.patch_matters import likelihood_scores
    from foveate.tools.store import ImageStore

    store = ImageStore()
    first, second = store.put(_scene()), store.put(_scene().rotate(90))
    items = [
        (first, "a red circle in the top left"),
        (first, "A red circle at the bottom"),
        (first, "a blue star on the right"),
        (second, "a red circle in the top left"),
    ]
    policy = Counting(tiny_policy)
    scores = likelihood_scores(policy, store, items, look_first=False)
    assert policy.scored == 3  # (first, red circle), (first, blue star), (second, red circle)
    assert scores[0] == scores[1] and all(0.0 < score < 1.0 for score in scores)
    assert len({round(score, 6) for score in scores}) > 1
