"""Tests for the synthetic world: geometry, ground-truth answers (recomputed independently), POPE negatives,
determinism, presets, rendering of labels, the task reader and the CLI."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from foveate.errors import FoveateError
from foveate.world import (
    BACKGROUNDS,
    COLORS,
    PRESETS,
    SHAPES,
    Scene,
    SceneConfig,
    generate_dataset,
    generate_questions,
    generate_scene,
    iter_items,
    iter_scenes,
    load_tasks,
    render_scene,
)
from foveate.world.cli import world_app
from foveate.world.scenes import SIZE_RANGES_672

SIZE_WORDS = {"tiny": "tiny", "small": "small", "medium-sized": "medium", "large": "large"}
PHRASE = re.compile(
    r"^the (?:(?P<size>tiny|small|medium-sized|large) )?(?:(?P<color>[a-z]+) )?(?P<noun>[a-z]+)"
    r'(?: marked "(?P<label>[A-Z0-9]+)")?$'
)


# ---------------------------------------------------------------- independent helpers (no world internals)


def scenes_of(preset: str, n: int, seed: int = 0) -> list[tuple[Scene, list[dict]]]:
    return list(itertools.islice(iter_scenes(seed, preset), n))


@pytest.fixture(scope="module")
def sample() -> list[tuple[Scene, list[dict]]]:
    """Scenes and questions from the 672 px presets (no rendering: cheap)."""
    out = []
    for preset in ("default", "small-detail", "large", "cluttered"):
        out += scenes_of(preset, 40, seed=3)
    return out


def resolve(scene: Scene, phrase: str) -> tuple[list, dict]:
    """Objects matching a noun phrase, parsed with the test's own grammar."""
    m = PHRASE.match(phrase)
    assert m, f"unparseable phrase {phrase!r}"
    attrs = {k: v for k, v in m.groupdict().items() if v}
    noun = attrs.pop("noun")
    if noun != "object":
        assert noun in SHAPES, phrase
        attrs["shape"] = noun
    if "color" in attrs:
        assert attrs["color"] in COLORS, phrase
    if "size" in attrs:
        attrs["size"] = SIZE_WORDS[attrs["size"]]
    key = {"shape": "shape", "color": "color", "size": "size_class", "label": "label"}
    found = [o for o in scene.objects if all(getattr(o, key[k]) == v for k, v in attrs.items())]
    return found, attrs


def resolve_one(scene: Scene, phrase: str) -> tuple:
    found, attrs = resolve(scene, phrase)
    assert len(found) == 1, f"{phrase!r} matches {len(found)} objects in {scene.id}"
    return found[0], attrs


def strictly(a: list[int], b: list[int], rel: str, margin: int) -> bool:
    return {
        "to the left of": a[2] + margin <= b[0],
        "to the right of": b[2] + margin <= a[0],
        "above": a[3] + margin <= b[1],
        "below": b[3] + margin <= a[1],
    }[rel]


def check_question(scene: Scene, q: dict) -> None:
    """Recompute the answer of one question from the scene's objects alone."""
    text, ans, fam = q["question"], q["answers"][0], q["family"]
    assert ans == ans.lower() and q["split"] in ("small-detail", "mid-detail", "large")
    margin = max(2, round(0.02 * min(scene.width, scene.height)))
    if fam == "attribute":
        m = re.fullmatch(r"What (color|shape) is (.+)\?", text)
        obj, attrs = resolve_one(scene, m.group(2))
        assert m.group(1) not in attrs, "the asked attribute must not describe the target"
        assert ans == (obj.color if m.group(1) == "color" else obj.shape)
        assert q["target_size"] == obj.size_class and obj.box in q["boxes"]
    elif fam == "existence":
        m = re.fullmatch(r"Is there an? ([a-z]+) ([a-z]+) in the image\?", text)
        present = any(o.color == m.group(1) and o.shape == m.group(2) for o in scene.objects)
        assert ans == ("yes" if present else "no")
    elif fam == "counting":
        m = re.fullmatch(r"How many (?:([a-z]+) )?([a-z]+) are there\?", text)
        color, noun = m.group(1), m.group(2)
        shape = None if noun == "objects" else next(s for s in SHAPES if noun in (s + "s", s + "es"))
        n = sum((color is None or o.color == color) and (shape is None or o.shape == shape) for o in scene.objects)
        assert ans == str(n) and n >= 1 and len(q["boxes"]) == n
    elif fam == "relation":
        m = re.fullmatch(r"Is (the .+?) (to the left of|to the right of|above|below) (the .+)\?", text)
        a, _ = resolve_one(scene, m.group(1))
        b, _ = resolve_one(scene, m.group(3))
        inverse = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below"}
        inverse["below"] = "above"
        if ans == "yes":
            assert strictly(a.box, b.box, m.group(2), margin)
        else:  # "no" must be unambiguous: the opposite relation holds strictly
            assert strictly(a.box, b.box, inverse[m.group(2)], margin)
    elif fam == "text":
        m = re.fullmatch(r"What is written (on|next to) (the .+)\?", text)
        obj, attrs = resolve_one(scene, m.group(2))
        assert "label" not in attrs and obj.label and ans == obj.label.lower()
        assert (m.group(1) == "on") == (obj.label_placement == "on")
        assert q["boxes"] == [obj.box, obj.label_box]
    elif fam == "comparison":
        if text.startswith("Which is larger"):
            m = re.fullmatch(r"Which is larger, (the .+?) or (the .+)\?", text)
            (a, aa), (b, ba) = resolve_one(scene, m.group(1)), resolve_one(scene, m.group(2))
            assert "size" not in aa and "size" not in ba
            assert (a.box[2] - a.box[0]) != (b.box[2] - b.box[0])
            big = a if a.box[2] - a.box[0] > b.box[2] - b.box[0] else b
            assert ans == big.shape and a.shape != b.shape
        else:
            m = re.fullmatch(r"Is (the .+?) the same (color|shape) as (the .+)\?", text)
            (a, aa), (b, ba) = resolve_one(scene, m.group(1)), resolve_one(scene, m.group(3))
            attr = m.group(2)
            assert attr not in aa and attr not in ba
            assert ans == ("yes" if getattr(a, attr) == getattr(b, attr) else "no")
    else:
        raise AssertionError(f"unknown family {fam}")


# ---------------------------------------------------------------- geometry


def check_geometry(scene: Scene, cfg: SceneConfig) -> None:
    w, h = scene.width, scene.height
    footprints = []
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        k = min(w, h) / 672 * cfg.object_scale
        lo, hi = SIZE_RANGES_672[o.size_class]
        assert round(lo * k) <= x2 - x1 <= round(hi * k) and x2 - x1 == y2 - y1
        fp = list(o.box)
        if o.label:
            lx1, ly1, lx2, ly2 = o.label_box
            assert 0 <= lx1 < lx2 <= w and 0 <= ly1 < ly2 <= h
            if o.label_placement == "on":
                assert x1 <= lx1 and lx2 <= x2 and y1 <= ly1 and ly2 <= y2
            fp = [min(x1, lx1), min(y1, ly1), max(x2, lx2), max(y2, ly2)]
        footprints.append(fp)
    for a, b in itertools.combinations(footprints, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"overlap in {scene.id}: {a} {b}"
    labels = [o.label for o in scene.objects if o.label]
    assert len(labels) == len(set(labels))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    preset=st.sampled_from(["default", "small-detail", "large", "cluttered", "single", "simple"]),
)
def test_random_scenes_are_valid_and_questions_correct(seed: int, preset: str) -> None:
    cfg = PRESETS[preset]
    rng = random.Random(seed)
    scene = generate_scene(rng, cfg.scene, "s")
    check_geometry(scene, cfg.scene)
    for q in generate_questions(scene, rng, 3, cfg.questions, cfg.scene):
        check_question(scene, q)


def test_sample_geometry_relations_and_answers(sample) -> None:
    for scene, questions in sample:
        check_geometry(scene, SceneConfig())
        margin = max(2, round(0.02 * min(scene.width, scene.height)))
        rels = {(r["subject"], r["relation"], r["object"]) for r in scene.relations}
        phrases = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
        for a, b in itertools.permutations(scene.objects, 2):
            for rel, phrase in phrases.items():
                assert ((a.id, rel, b.id) in rels) == strictly(a.box, b.box, phrase, margin)
        for q in questions:
            check_question(scene, q)
    families = {q["family"] for _, qs in sample for q in qs}
    assert families == {"attribute", "existence", "counting", "relation", "text", "comparison"}


def test_numpy_generator_and_description(sample) -> None:
    scene = generate_scene(np.random.default_rng(5), SceneConfig(), "np")
    assert scene.objects and scene.description.startswith(f"A {scene.width}x{scene.height} image")
    for o in scene.objects:
        assert f"{o.size_class} {o.color} {o.shape}" in scene.description
        if o.label:
            assert f'"{o.label}"' in scene.description


# ---------------------------------------------------------------- existence (POPE)


def test_existence_negatives_follow_pope_definitions(sample) -> None:
    prior_c = dict(zip(COLORS, SceneConfig().color_weights, strict=True))
    prior_s = dict(zip(SHAPES, SceneConfig().shape_weights, strict=True))
    answers = []
    for scene, questions in sample + scenes_of("default", 150, seed=11):
        present = {(o.color, o.shape) for o in scene.objects}
        for q in questions:
            if q["family"] != "existence":
                continue
            color, shape = re.fullmatch(r"Is there an? ([a-z]+) ([a-z]+) in the image\?", q["question"]).groups()
            answers.append(q["answers"][0])
            if q["answers"][0] == "yes":
                assert (color, shape) in present
                continue
            assert (color, shape) not in present
            one_off = [o for o in scene.objects if (o.color == color) != (o.shape == shape)]
            if q["subtype"] == "adversarial":
                assert one_off, "adversarial negatives differ from a present object in exactly one attribute"
            if q["subtype"] == "popular":
                absent = sorted(
                    (prior_c[c] * prior_s[s] for c in COLORS for s in SHAPES if (c, s) not in present), reverse=True
                )
                assert prior_c[color] * prior_s[shape] >= absent[2], "popular = among the 3 most frequent absent"
            assert sorted(q["boxes"]) == sorted(o.box for o in one_off)
    assert len(answers) > 60
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


# ---------------------------------------------------------------- presets and splits


def test_small_detail_and_large_presets_split_by_target_size() -> None:
    for scene, questions in scenes_of("small-detail", 25):
        assert sum(o.size_class in ("medium", "large") for o in scene.objects) >= 1  # big distractors present
        for q in questions:
            assert q["split"] == "small-detail" and q["target_size"] == "tiny"
            sides = [b[2] - b[0] for b in q["boxes"]]
            assert min(sides) <= 40 / 1344 * scene.width  # the evidence includes a tiny box (<= 40 px at 1344)
    for _, questions in scenes_of("large", 25):
        for q in questions:
            assert q["split"] == "large" and q["target_size"] in ("medium", "large", None)


def test_small_detail_targets_are_illegible_at_input_and_full_size_in_the_oracle_crop() -> None:
    """The zoom regime: at a 336 px input (3x3-merged tokens of 42 px) a tiny target is a fraction of a token;
    the oracle-crop window (side = the input side) shows it at full size."""
    from foveate.agents.oracle_crop import oracle_window
    from foveate.tools.boxes import Box

    input_side = 336
    for scene, questions in scenes_of("small-detail", 15):
        scale_direct = input_side / max(scene.width, scene.height)
        objects = {obj.id: obj for obj in scene.objects}
        for q in questions:
            targets = [objects[i] for i in q["object_ids"] if objects[i].size_class == "tiny"]
            if not targets:  # an existence "no" with no near-miss object
                continue
            x1, y1, x2, y2 = targets[0].box
            side = max(x2 - x1, y2 - y1)
            window = oracle_window(Box(x1, y1, x2, y2), (scene.width, scene.height), input_side)
            scale_crop = input_side / max(window.width, window.height)
            assert side * scale_direct <= 10.5  # under a quarter of a 42 px token
            assert side * scale_crop >= 3.9 * side * scale_direct and side * scale_crop >= 20


def test_objects_preset_draws_objects_at_the_demo_inputs_scale() -> None:
    """`objects` (vision pretraining) draws a 168 px scene whose objects have the side a 672 px scene's objects have
    at a 336 px input, so a processor that keeps 168 px as drawn sees them at the demo model's scale."""
    from foveate.world.scenes import SIZE_RANGES_672

    for scene, questions in scenes_of("objects", 30):
        assert (scene.width, scene.height) == (168, 168) and 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            lo, hi = SIZE_RANGES_672[obj.size_class]
            assert round(lo / 2) <= obj.box[2] - obj.box[0] <= round(hi / 2)
        assert questions and all(q["split"] == "large" for q in questions)
    # The demo processor (336 px at most, 14 px patches, 3x3 merge) keeps the last scene as drawn: 12x12 patches.
    from foveate.api import DEMO_MODEL_DIR
    from foveate.policies.loading import load_processor

    processed = load_processor(DEMO_MODEL_DIR).image_processor(images=[render_scene(scene)], return_tensors="pt")
    assert processed["image_grid_thw"].tolist() == [[1, 12, 12]]


def test_every_preset_generates(tmp_path: Path) -> None:
    for name in PRESETS:
        rows = [row for _, _, row in iter_items(2, seed=1, preset=name)] if name != "highres" else []
        assert len(rows) == 2 or name == "highres"
        assert all(r["preset"] == name for r in rows)
    tasks = load_tasks(generate_dataset(tmp_path / "hr", n=2, seed=0, preset="highres"))
    assert len(tasks) == 2
    for row in tasks:
        from PIL import Image

        with Image.open(row["image"]) as im:
            assert max(im.size) == 2048 and list(im.size) == row["image_size"]
        assert row["target_size"] == "tiny"
    with pytest.raises(FoveateError, match="unknown world preset"):
        next(iter_items(1, 0, "nope"))


def test_cluttered_preset_is_cluttered() -> None:
    for scene, questions in scenes_of("cluttered", 10):
        assert scene.clutter in ("noise", "stripes", "lines")
        assert all(q["clutter"] == "cluttered" for q in questions)


# ---------------------------------------------------------------- rendering


def test_render_objects_and_labels() -> None:
    checked_labels = 0
    for scene, _ in scenes_of("default", 8, seed=2) + scenes_of("cluttered", 4, seed=2):
        img = np.asarray(render_scene(scene)).astype(int)
        assert img.shape == (scene.height, scene.width, 3)
        bg = np.array(BACKGROUNDS[scene.background])
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            if o.shape in ("circle", "square", "hexagon", "diamond") and o.label_placement != "on":
                assert np.abs(img[cy, cx] - np.array(COLORS[o.color])).max() <= 2
            if not o.label:
                continue
            lx1, ly1, lx2, ly2 = o.label_box
            patch = img[ly1:ly2, lx1:lx2].reshape(-1, 3)
            ref = np.array(COLORS[o.color]) if o.label_placement == "on" else bg
            ink = np.abs(patch - ref).max(axis=1) > 60  # far from the fill/background: text pixels
            assert ink.sum() >= 4, f"label {o.label} of {o.id} not visible in {scene.id}"
            checked_labels += 1
    assert checked_labels >= 10


# ---------------------------------------------------------------- datasets on disk


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_dataset_is_deterministic(tmp_path: Path) -> None:
    a = file_bytes(generate_dataset(tmp_path / "a", n=9, seed=4, preset="cluttered").parent)
    b = file_bytes(generate_dataset(tmp_path / "b", n=9, seed=4, preset="cluttered").parent)
    c = file_bytes(generate_dataset(tmp_path / "c", n=9, seed=5, preset="cluttered").parent)
    assert a == b
    assert any(k.endswith(".png") for k in a) and "scenes.jsonl" in a and "tasks.jsonl" in a
    assert a["tasks.jsonl"] != c["tasks.jsonl"] and a["scenes.jsonl"] != c["scenes.jsonl"]
    assert [v for k, v in a.items() if k.endswith(".png")] != [v for k, v in c.items() if k.endswith(".png")]


def test_dataset_rows_scenes_and_stream_agree(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path / "d", n=7, seed=2, preset="default")
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(raw) == 7
    keys = {"id", "image", "question", "answers", "family", "split", "clutter", "boxes", "image_size"}
    assert all(keys | {"scene_id", "preset", "subtype", "target_size"} <= set(r) for r in raw)
    streamed = [row for _, _, row in iter_items(7, seed=2, preset="default")]
    assert streamed == raw
    assert [r for _, _, r in iter_items(4, 2, "default")] == raw[:4]  # a larger n extends, never reshuffles
    scenes = {}
    for line in (path.parent / "scenes.jsonl").read_text().splitlines():
        data = json.loads(line)
        assert data["image"] == f"images/{data['id']}.png"
        scenes[data["id"]] = Scene.from_dict(data)
    for row in raw:
        scene = scenes[row["scene_id"]]
        assert (path.parent / row["image"]).is_file() and row["image_size"] == [scene.width, scene.height]
        check_question(scene, row)
    tasks = load_tasks(path.parent)  # a directory works too
    assert all(Path(t["image"]).is_absolute() and Path(t["image"]).is_file() for t in tasks)


def test_load_tasks_errors_and_defaults(tmp_path: Path) -> None:
    p = tmp_path / "tasks.jsonl"
    p.write_text(json.dumps({"id": "x", "image": "img.png", "question": "q?", "answers": ["a"]}) + "\n\n")
    (row,) = load_tasks(p)
    assert row["image"] == str((tmp_path / "img.png").resolve()) and row["boxes"] == [] and row["family"] == "unknown"
    p.write_text(json.dumps({"id": "x", "image": "img.png"}) + "\n")
    with pytest.raises(FoveateError, match=r":1: missing key\(s\) question, answers"):
        load_tasks(p)
    p.write_text("{not json\n")
    with pytest.raises(FoveateError, match="not valid JSON"):
        load_tasks(p)
    with pytest.raises(FoveateError, match="not found"):
        load_tasks(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- CLI


def test_cli_generate(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(world_app, ["generate", "--out", str(out), "--n", "5", "--seed", "1", "--preset", "large"])
    assert result.exit_code == 0, result.output
    assert "5 questions" in result.output and "large" in result.output
    assert len((out / "tasks.jsonl").read_text().splitlines()) == 5
    bad = runner.invoke(world_app, ["generate", "--out", str(out), "--n", "1", "--preset", "nope"])
    assert bad.exit_code == 2 and "unknown world preset" in bad.output
    listing = runner.invoke(world_app, ["presets"])
    assert listing.exit_code == 0 and "highres" in listing.output


@pytest.mark.parametrize("preset", ["default", "cluttered", "simple"])
def test_referents_name_the_objects_every_question_asks_about(preset: str) -> None:
    from foveate.world.describe import unique_reference
    from foveate.world.questions import referents

    for _scene, rows in itertools.islice(iter_scenes(11, preset), 30):
        for row in rows:
            phrases = referents(row["question"])
            if row["family"] == "grounding":
                assert phrases == []
                continue
            assert phrases and all(phrase in row["question"] for phrase in phrases)
            if row["family"] in ("attribute", "text", "relation", "comparison"):  # unique references: one object each
                assert len(phrases) == len(row["object_ids"])
    # An attribute question's referent is exactly the unique phrase of the asked object.
    for scene, rows in itertools.islice(iter_scenes(3, "simple"), 20):
        objects = {o.id: o for o in scene.objects}
        for row in (r for r in rows if r["family"] == "attribute"):
            target = objects[row["object_ids"][0]]
            assert referents(row["question"]) == [unique_reference(scene, target, exclude=(row["subtype"],))[0]]
    assert referents("Locate the red star. Answer with its bounding box.") == []
    assert referents("What is this?") == []
