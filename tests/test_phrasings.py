"""World questions reworded (foveate.world.phrasings): the answer is kept (negations flip it), the new referents name
the same objects in the scene, the pools are disjoint, and training and the evaluator read them."""

from __future__ import annotations

import collections
import itertools
import json
import random
import re

import pytest
from test_world import check_question, resolve, resolve_one, scenes_of

from foveate import protocol
from foveate.errors import FoveateError
from foveate.eval.runner import resolve_tasks
from foveate.rl.sft_data import DataMix, example_stream, scene_rows, short_answer
from foveate.world.phrasings import HELDOUT, PHRASINGS, POOLS, phrasings_for, rephrase
from foveate.world.questions import referents as template_referents
from foveate.world.scenes import SHAPES

FAMILIES = ("attribute", "existence", "counting", "relation", "text", "comparison")
# The test's own map back to the world's words (not the module's): nouns and the synonyms the answers accept.
BACK = {"thing": "object", "item": "object", "shape": "object", "violet": "purple", "turquoise": "cyan"}
BACK |= {"disc": "circle", "rhombus": "diamond", "things": "objects", "items": "objects", "shapes": "objects"}
BACK |= {"discs": "circles", "rhombuses": "diamonds"}
NEGATION = re.compile(r"\b(no|free of|absent|different)\b")


def world_words(phrase: str) -> str:
    head, sep, label = phrase.partition(' marked "')
    return " ".join(BACK.get(w, w) for w in head.split()) + sep + label


@pytest.fixture(scope="module")
def sample() -> list:
    out = []
    for preset in ("default", "large", "simple", "cluttered"):
        out += scenes_of(preset, 60, seed=11)
    return out


def same_things(scene, family: str, old: list[str], new: list[str]) -> None:
    """The reworded referents pick out what the template's did, resolved with test_world's own grammar."""
    new = [world_words(p) for p in new]
    if family == "existence":
        (color, shape), target = old[0].split()[1:], new[0].removeprefix("a ").removeprefix("an ").split()
        plural = {s + "s": s for s in SHAPES} | {"crosses": "cross"}
        assert [target[0], plural.get(target[1], target[1])] == [color, shape]
    elif family == "counting":
        assert new == old
    else:
        assert [resolve_one(scene, "the " + p.removeprefix("the "))[0] for p in new] == [
            resolve_one(scene, p)[0] for p in old
        ]


@pytest.mark.parametrize("pool", POOLS)
def test_every_family_keeps_its_answer_and_its_referents_name_the_same_objects(sample, pool: str) -> None:
    rng = random.Random(0)
    used, flipped = collections.Counter(), 0
    for scene, rows in sample:
        for row in rows:
            check_question(scene, row)  # the template row is right to begin with
            new = rephrase(row, rng, pool, len(scene.objects))
            assert new["phrasing"] in {p.id for p in phrasings_for(row, pool, len(scene.objects))}
            assert new["source_question"] == row["question"]
            for key in ("family", "subtype", "boxes", "object_ids", "split", "target_size"):
                assert new[key] == row[key]
            for phrase in new["referents"]:
                assert phrase in new["question"], (phrase, new["question"])
            negated = bool(NEGATION.search(new["question"]))
            if negated:
                flipped += 1
                assert new["answers"] == [{"yes": "no", "no": "yes"}[row["answers"][0]]], new
            else:
                assert new["answers"] == row["answers"], new
            if new["referents"] in (["the shape"], ["the image"], ["the picture"], ["the object in the image"]):
                assert len(scene.objects) == 1  # whole-image wordings only for one-object scenes
            else:
                same_things(scene, row["family"], template_referents(row["question"]), new["referents"])
            used[new["phrasing"]] += 1
    assert {pid.split("/")[0] for pid in used} == set(FAMILIES)
    assert flipped > 10


def test_pools_are_disjoint_fixed_and_cover_every_family_and_subtype() -> None:
    ids = [p.id for p in PHRASINGS]
    assert len(ids) == len(set(ids)) and set(ids) > HELDOUT
    assert 0.2 <= len(HELDOUT) / len(ids) <= 0.3
    for kind in {p.kind for p in PHRASINGS}:
        kinds = [p for p in PHRASINGS if p.kind == kind]
        assert any(p.id in HELDOUT for p in kinds) and any(p.id not in HELDOUT for p in kinds), kind
    heldout = [p for p in PHRASINGS if p.id in HELDOUT]
    assert any(p.flip for p in heldout) and any(p.vocab for p in heldout) and any(p.noun for p in heldout)
    assert any("colour" in p.text or p.british for p in heldout) and any(p.whole for p in heldout)
    row = {"question": "What color is the star?", "answers": ["red"], "family": "attribute", "subtype": "color"}
    train, held = phrasings_for(row, "train", 1), phrasings_for(row, "heldout", 1)
    assert not {p.id for p in train} & {p.id for p in held}
    assert all(p.whole is None for p in phrasings_for(row, "train", 3))
    with pytest.raises(ValueError, match="heldout"):
        rephrase(row, random.Random(0), "test")


def test_every_wording_is_reachable_and_drawing_is_deterministic(sample) -> None:
    seen = set()
    for pool, seed in itertools.product(POOLS, range(6)):
        rng_a, rng_b = random.Random(seed), random.Random(seed)
        for scene, rows in sample:
            for row in rows:
                a, b = rephrase(row, rng_a, pool, len(scene.objects)), rephrase(row, rng_b, pool, len(scene.objects))
                assert a == b
                seen.add(a["phrasing"])
    assert seen == {p.id for p in PHRASINGS}
    starts = {rephrase(row, random.Random(i), "train")["question"][0].islower() for i, (_, rows) in
              enumerate(sample) for row in rows}  # fmt: skip
    assert starts == {True, False}  # sentence case and lower case


def test_negated_existence_flips_yes_and_no() -> None:
    row = {"question": "Is there a red star in the image?", "answers": ["yes"], "family": "existence"}
    for seed in range(200):
        new = rephrase(row, random.Random(seed), "train")
        if new["phrasing"] == "existence/no":
            assert new["question"].lower() == "is there no red star in the image?"
            assert new["answers"] == ["no"] and new["referents"] == ["red star"]
            break
    else:
        raise AssertionError("existence/no never drawn")


def test_choice_grounding_caption_and_foreign_rows_come_back_unchanged() -> None:
    from foveate.world import iter_items

    zoom = [row for _, _, row in iter_items(12, 5, "zoom")]
    choice = [row for row in zoom if row.get("scoring") == "choice"]
    assert choice
    others = [
        {"question": "Locate the red star. Answer with its bounding box.", "answers": [], "family": "grounding"},
        {"question": protocol.DESCRIBE_PROMPT, "answers": ["A scene."], "family": "caption"},
        {"question": "What is this?", "answers": ["x"], "family": "attribute", "subtype": "color"},
    ]
    for row in choice + others:
        assert rephrase(row, random.Random(1), "train") == row
    opened = [row for row in zoom if row.get("scoring") != "choice"]
    assert all("phrasing" in rephrase(row, random.Random(1), "train") for row in opened)  # open zoom rows reword


def test_sft_stream_rewords_rows_and_restates_the_new_referents_first() -> None:
    mix = DataMix(formats={"qa": 1.0}, presets={"simple": 1.0}, look_first=True, phrasings=1.0)
    examples = list(itertools.islice(example_stream(3, mix), 60))
    reworded = 0
    for example in examples:
        question = example["messages"][0]["content"][-1]["text"]
        reply = example["messages"][-1]["content"]
        refs = example.get("referents")
        assert refs is not None, question  # every row of the simple preset's families is reworded
        thought = reply.removeprefix(protocol.THOUGHT_OPEN).split(protocol.THOUGHT_CLOSE)[0]
        assert thought.startswith("; ".join(refs)), (question, reply)
        reworded += not template_referents(question)
    assert reworded > len(examples) // 2
    # Off (the default): the stream draws exactly what it drew before the field existed.
    plain = DataMix(formats={"qa": 1.0}, presets={"simple": 1.0}, look_first=True)
    for example in itertools.islice(example_stream(3, plain), 20):
        assert "referents" not in example and template_referents(example["messages"][0]["content"][-1]["text"])
    with pytest.raises(ValueError, match="phrasings"):
        DataMix(phrasings=1.5)


def test_scene_rows_and_short_answer_use_a_rows_own_referents() -> None:
    scene, rows = scenes_of("simple", 1, seed=2)[0]
    mix = DataMix(look_first=True, phrasings=1.0)
    new = scene_rows(scene, rows, "simple", random.Random(0), mix)
    assert all("phrasing" in row for row in new)
    for row in new:
        assert short_answer(row, mix) == protocol.look_answer(row["referents"], row["answers"][0])


def test_eval_task_spelling_selects_the_pool_on_the_same_items(tmp_path) -> None:
    plain = resolve_tasks("world:simple", n=40, home=tmp_path)
    held = resolve_tasks("world:simple@heldout", n=40, home=tmp_path)
    train = resolve_tasks("world:simple@train", n=40, home=tmp_path)
    assert plain.phrasing is None and held.phrasing == "heldout" and train.phrasing == "train"
    assert len({plain.key, held.key, train.key}) == 3
    for a, b, c in zip(plain.rows, held.rows, train.rows, strict=True):
        assert a["id"] == b["id"] == c["id"] and a["image"] == b["image"] == c["image"]
        assert b["phrasing"] in HELDOUT and c["phrasing"] not in HELDOUT
    assert [r["question"] for r in resolve_tasks("world:simple@heldout", n=40, home=tmp_path).rows] == [
        r["question"] for r in held.rows
    ]
    lines = (held.path.parent / "scenes.jsonl").read_text(encoding="utf-8").splitlines()
    scenes = {scene["id"]: scene for scene in map(json.loads, lines)}
    for row in held.rows:
        if row["referents"] == ["the image"]:
            assert len(scenes[row["scene_id"]]["objects"]) == 1
    with pytest.raises(FoveateError, match="phrasing pool"):
        resolve_tasks("world:simple@test", n=5, home=tmp_path)


def test_unresolvable_test_grammar_is_strict() -> None:
    """The test's own resolver fails on a phrase naming nothing, so the referent checks above can fail."""
    scene, _ = scenes_of("simple", 1, seed=2)[0]
    found, _ = resolve(scene, "the " + next(s for s in SHAPES if s not in {o.shape for o in scene.objects}))
    assert found == []


def test_eval_cli_prints_the_pool_and_records_it_in_the_task_key(tiny_model_dir, tmp_path, capsys) -> None:
    from foveate.cli import main

    out = tmp_path / "held.json"
    argv = ["eval", "--task", "world:simple@heldout", "--strategies", "direct", "--n", "3"]
    main([*argv, "--model", str(tiny_model_dir), "--out", str(out), "--max-new-tokens", "3"])
    assert "reworded from the 'heldout' phrasing pool" in capsys.readouterr().err
    document = json.loads(out.read_text())
    assert document["task"] == "world:simple@heldout" and document["task_key"].endswith("@seed1000@heldout")
    items = [json.loads(line) for line in (tmp_path / "held.items.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in items) == sorted(r["id"] for r in resolve_tasks("world:simple", n=3).rows)


def test_percept_existence_thoughts_read_reworded_and_negated_questions() -> None:
    """With `existence_thought="percept"` the thought names what the colour's lookup finds; the answer says whether
    that is the asked object, flipped when the wording is negated."""
    mix = DataMix(formats={"qa": 1.0}, presets={"simple": 1.0}, look_first=True, existence_thought="percept")
    mix.phrasings = 1.0
    checked = negated = 0
    for example in itertools.islice(example_stream(4, mix), 150):
        question = example["messages"][0]["content"][-1]["text"]
        reply = example["messages"][-1]["content"]
        refs = example.get("referents", [])
        if len(refs) != 1 or reply.rsplit(protocol.THOUGHT_CLOSE, 1)[-1] not in ("yes", "no"):
            continue  # existence only: the simple preset's other yes / no family (relation) names two objects
        words = [world_words(w) for w in refs[0].split()]
        color, shape = words[-2], words[-1].removesuffix("es" if words[-1] == "crosses" else "s")
        shape = shape if shape in SHAPES else words[-1]
        percept, answer = reply.removeprefix(protocol.THOUGHT_OPEN).split(protocol.THOUGHT_CLOSE)[0].rsplit(" ", 1)
        found = percept == f"{color} {shape}"
        flip = bool(NEGATION.search(question))
        negated += flip
        assert answer == ("yes" if found != flip else "no"), (question, reply)
        checked += 1
    assert checked > 10 and negated > 2
