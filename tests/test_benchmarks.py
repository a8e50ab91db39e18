"""Real-benchmark loaders on fixtures in each benchmark's published layout (tests/fixtures/), malformed files
included, and their rows through the evaluator's scoring, report, resolver and the convert command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from foveate.cli import app, main
from foveate.errors import FoveateError
from foveate.eval.benchmarks import load_pope, load_textvqa, load_vstar
from foveate.eval.metrics import score_answer, vqa_normalize, vqa_official_accuracy
from foveate.eval.report import aggregate
from foveate.eval.runner import load_eval_tasks, resolve_tasks, run_eval

FIXTURES = Path(__file__).parent / "fixtures"
VSTAR = FIXTURES / "vstar_bench"
POPE = FIXTURES / "pope" / "coco_pope_adversarial.json"
POPE_IMAGES = FIXTURES / "pope" / "val2014"
TEXTVQA = FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json"
TEXTVQA_IMAGES = FIXTURES / "textvqa" / "train_images"


def _score(prediction: str, row: dict) -> float:
    return score_answer(prediction, row, (100, 100))["score"]


# ---- V* Bench -----------------------------------------------------------------------------------------------
def test_vstar_from_test_questions_jsonl():
    rows = load_vstar(VSTAR)
    assert [r["id"] for r in rows] == ["vstar-0", "vstar-1", "vstar-2"]
    first = rows[0]
    assert first["options"] == ["blue", "red", "green", "white"] and first["answers"] == ["B", "red"]
    assert first["question"].split("\n")[1:] == [
        "(A) blue",
        "(B) red",
        "(C) green",
        "(D) white",
        "Answer with the option's letter from the given choices directly.",
    ]
    assert first["boxes"] == [[70.0, 40.0, 78.0, 48.0]]  # the image's JSON bbox, x y w h -> x1 y1 x2 y2
    assert {r["family"] for r in rows} == {"direct_attributes", "relative_position"}
    assert all(r["split"] == "vstar" and r["scoring"] == "choice" and Path(r["image"]).is_file() for r in rows)
    assert _score("B", first) == _score("(B) red", first) == _score("red", first) == 1.0
    assert _score("blue", first) == _score("A", first) == 0.0


def test_vstar_from_the_folders_alone(tmp_path):
    copy = shutil.copytree(VSTAR, tmp_path / "vstar", ignore=shutil.ignore_patterns("*.jsonl"))
    rows = load_vstar(copy)
    assert len(rows) == 3
    by_id = {r["id"]: r for r in rows}
    ball = by_id["vstar-direct_attributes-sa_101"]
    assert sorted(ball["options"]) == sorted(["red", "blue", "green", "white"])
    assert ball["answers"][1] == "red" and ball["options"]["ABCD".index(ball["answers"][0])] == "red"
    dog = by_id["vstar-relative_position-sa_201"]
    assert dog["boxes"] == [[10.0, 20.0, 20.0, 30.0], [90.0, 20.0, 100.0, 30.0]]
    assert load_vstar(copy) == rows  # the option shuffle is seeded per image
    # The raw files list the answer first; the shuffle must not leave it there for every question.
    assert {r["answers"][0] for r in rows} != {"A"}


def _corrupt(tmp_path: Path, relative: str, text: str) -> Path:
    copy = shutil.copytree(VSTAR, tmp_path / "vstar")
    (copy / relative).write_text(text, encoding="utf-8")
    return copy


def test_vstar_malformed_files_name_file_and_line(tmp_path):
    copy = _corrupt(
        tmp_path / "a", "test_questions.jsonl", VSTAR.joinpath("test_questions.jsonl").read_text() + "{oops\n"
    )
    with pytest.raises(FoveateError, match=r"test_questions\.jsonl:4: not valid JSON"):
        load_vstar(copy)
    lines = VSTAR.joinpath("test_questions.jsonl").read_text().splitlines()
    bad = json.loads(lines[1]) | {"label": "E"}
    copy = _corrupt(tmp_path / "b", "test_questions.jsonl", "\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(FoveateError, match=r"test_questions\.jsonl:2: 'label' must be one of the option letters"):
        load_vstar(copy)
    missing = {k: v for k, v in json.loads(lines[0]).items() if k != "text"}
    copy = _corrupt(tmp_path / "c", "test_questions.jsonl", json.dumps(missing) + "\n")
    with pytest.raises(FoveateError, match=r"test_questions\.jsonl:1: missing key\(s\) text"):
        load_vstar(copy)
    folders = shutil.copytree(VSTAR, tmp_path / "d", ignore=shutil.ignore_patterns("*.jsonl"))
    (folders / "relative_position/sa_201.json").write_text('{"question": "x",\n "options": ["a"\n', encoding="utf-8")
    with pytest.raises(FoveateError, match=r"sa_201\.json:3: not valid JSON"):
        load_vstar(folders)
    (folders / "relative_position/sa_201.json").write_text('{"question": "x", "options": ["only one"]}')
    with pytest.raises(FoveateError, match=r"sa_201\.json: 'options' must be a list of at least two"):
        load_vstar(folders)
    (folders / "relative_position/sa_201.json").unlink()
    with pytest.raises(FoveateError, match=r"sa_201\.jpg: no annotation sa_201\.json"):
        load_vstar(folders)
    with pytest.raises(FoveateError, match="not a V\\* Bench copy"):
        load_vstar(tmp_path)


# ---- POPE ---------------------------------------------------------------------------------------------------
def test_pope_rows_and_metrics():
    rows = load_pope(POPE, POPE_IMAGES)
    assert [r["answers"] for r in rows] == [["yes"], ["no"], ["no"], ["yes"]]
    assert {(r["family"], r["subtype"], r["split"]) for r in rows} == {("existence", "adversarial", "pope")}
    assert rows[0]["question"] == "Is there a ball in the image?"
    records = [
        {"strategy": "s", "family": r["family"], "subtype": r["subtype"], "split": r["split"], "answers": r["answers"]}
        | {"prediction": p, "score": _score(p, r)}
        for r, p in zip(rows, ["Yes.", "yes", "No", "no"], strict=True)
    ]
    row = next(a for a in aggregate(records) if a["family"] == "existence")
    # tp 1, fp 1, tn 1, fn 1: every POPE metric is 0.5
    assert row["accuracy"] == row["precision"] == row["recall"] == row["f1"] == row["yes_ratio"] == 0.5
    assert row["pope_by_subtype"]["adversarial"]["n"] == 4


def test_pope_json_array_and_malformed(tmp_path):
    entries = [json.loads(line) for line in POPE.read_text().splitlines()]
    array = tmp_path / "coco_pope_random.json"
    array.write_text(json.dumps(entries, indent=1))
    rows = load_pope(array, POPE_IMAGES)
    assert len(rows) == 4 and rows[0]["subtype"] == "random"
    bad = tmp_path / "coco_pope_popular.json"
    lines = POPE.read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"question_id": 3, "image": "x.jpg"', lines[3]]) + "\n")
    with pytest.raises(FoveateError, match=r"coco_pope_popular\.json:3: not valid JSON"):
        load_pope(bad, POPE_IMAGES)
    bad.write_text(lines[0] + "\n" + json.dumps(json.loads(lines[1]) | {"label": "maybe"}) + "\n")
    with pytest.raises(FoveateError, match=r"coco_pope_popular\.json:2: 'label' must be yes or no"):
        load_pope(bad, POPE_IMAGES)
    bad.write_text(lines[0] + "\n" + json.dumps({"question_id": 9, "image": "a.jpg"}) + "\n")
    with pytest.raises(FoveateError, match=r"coco_pope_popular\.json:2: missing key\(s\) text, label"):
        load_pope(bad, POPE_IMAGES)
    array.write_text(json.dumps(entries[:2] + [{"question_id": 5}], indent=1))
    with pytest.raises(FoveateError, match=r"coco_pope_random\.json:\d+: missing key"):
        load_pope(array, POPE_IMAGES)
    with pytest.raises(FoveateError, match=r"coco_pope_adversarial\.json:1: image not found: .*COCO_val2014"):
        load_pope(POPE)  # images default to the file's folder, where they are not
    bad.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(FoveateError, match=r":2: duplicate question_id 1"):
        load_pope(bad, POPE_IMAGES)


# ---- TextVQA ------------------------------------------------------------------------------------------------
def test_textvqa_rows_and_vqa_accuracy():
    rows = load_textvqa(TEXTVQA, TEXTVQA_IMAGES)
    assert [r["id"] for r in rows] == ["textvqa-34602", "textvqa-34603"]
    camera, jersey = rows
    assert len(camera["answers"]) == 10 and camera["scoring"] == "vqa_official" and camera["family"] == "text"
    # "dakota" was given by 5 of 10 annotators: full credit in every leave-one-out subset
    assert _score("Dakota.", camera) == 1.0
    # "dakota digital" by 3: 7 subsets keep all 3 (1.0), 3 subsets keep 2 (2/3) -> 0.9
    assert _score("dakota digital", camera) == pytest.approx(0.9)
    assert _score("nous les gosses", camera) == pytest.approx(0.3)  # 1 annotator: 9 x 1/3 / 10
    # "twenty two" (no digit word: only zero-ten become digits) is what the tenth annotator said; a hyphen not
    # touching a space becomes one
    assert _score("Twenty-two", jersey) == _score("twenty two", jersey) == pytest.approx(0.3)
    assert _score("23", jersey) == 0.0
    assert _score("22", jersey) == 1.0


def test_vqa_normalisation():
    assert vqa_normalize("The answer: Two!") == "answer: 2"
    assert vqa_normalize("yes, it is") == "yes it is"
    assert vqa_normalize("1,000 dollars") == "1000 dollars"
    assert vqa_normalize("its logo") == "its logo"  # a word, not a contraction
    assert vqa_normalize("hes") == "he's"
    assert vqa_official_accuracy("3", ["3"] * 2 + ["4"] * 8) == pytest.approx(0.6)  # 8 x 2/3 x ... see below
    # Leave-one-out by hand: leaving out one of the 2 matching -> 1/3; one of the 8 others -> 2/3.
    assert vqa_official_accuracy("3", ["3"] * 2 + ["4"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_textvqa_malformed(tmp_path):
    doc = json.loads(TEXTVQA.read_text())
    bad = tmp_path / "TextVQA_0.5.1_val.json"
    text = json.dumps(doc, indent=2)
    bad.write_text(text[:-40])
    with pytest.raises(FoveateError, match=r"TextVQA_0\.5\.1_val\.json:\d+: not valid JSON"):
        load_textvqa(bad, TEXTVQA_IMAGES)
    del doc["data"][1]["answers"]
    bad.write_text(json.dumps(doc, indent=2))
    entry_lines = [i + 1 for i, line in enumerate(json.dumps(doc, indent=2).splitlines()) if line == "    {"]
    with pytest.raises(FoveateError, match=rf"TextVQA_0\.5\.1_val\.json:{entry_lines[1]}: missing key\(s\) answers"):
        load_textvqa(bad, TEXTVQA_IMAGES)
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(FoveateError, match=r'expected \{"data": \[\.\.\.\]\}'):
        load_textvqa(bad, TEXTVQA_IMAGES)
    with pytest.raises(FoveateError, match=r"image not found: .*003a8ae2ef43b901\.jpg"):
        load_textvqa(TEXTVQA, tmp_path)


# ---- through the evaluator ----------------------------------------------------------------------------------
def test_resolve_tasks_reads_benchmarks_and_convert_round_trips(tmp_path, capsys):
    tasks = resolve_tasks(f"pope:{POPE}", images=str(POPE_IMAGES))
    assert len(tasks.rows) == 4 and tasks.key.startswith("pope:") and "images=" in tasks.key
    assert len(resolve_tasks(f"vstar:{VSTAR}", n=2).rows) == 2
    with pytest.raises(FoveateError, match="images folder not found"):
        resolve_tasks(f"textvqa:{TEXTVQA}", images=str(tmp_path / "nowhere"))
    result = CliRunner().invoke(
        app, ["data", "convert", "textvqa", str(TEXTVQA), "--images", str(TEXTVQA_IMAGES), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "2 questions written" in result.output
    converted = load_eval_tasks(tmp_path / "tasks.jsonl")
    assert converted == load_textvqa(TEXTVQA, TEXTVQA_IMAGES)
    with pytest.raises(SystemExit) as exit_info:  # through the real entry point: one line on stderr, status 2
        main(["data", "convert", "pope", str(POPE), "--out", str(tmp_path / "p")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "coco_pope_adversarial.json:1: image not found" in error.replace("\n", "")


@pytest.mark.slow  # two strategies on the real tiny model: about 15 s
def test_vstar_through_run_eval_with_the_tiny_model(tiny_policy, tmp_path):
    """The real tiny model answers V* rows; oracle-crop uses V*'s boxes; choice scoring is what the report shows."""
    tasks = resolve_tasks(f"vstar:{VSTAR}")
    records = run_eval(
        tasks, ["direct", "oracle-crop"], tiny_policy, items_path=tmp_path / "r.items.jsonl", max_new_tokens=4
    )
    assert len(records) == 6 and not any(r.get("error") or r.get("skipped") for r in records)
    assert {r["scoring"] for r in records} == {"choice"}
    for record, row in zip(records, tasks.rows * 2, strict=True):
        assert record["score"] == _score(record["prediction"], row)
    assert any(r["crop_boxes"] for r in records if r["strategy"] == "oracle-crop")
    families = {(a["family"], a["split"]) for a in aggregate(records)}
    assert ("direct_attributes", "vstar") in families and ("relative_position", "vstar") in families
