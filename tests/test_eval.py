"""`foveate eval` end to end: a tiny world task set, the tiny model, resuming, kill-safety, the CLI and JSON."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from foveate.errors import FoveateError
from foveate.eval.report import aggregate, print_tables, results_json, write_results
from foveate.eval.runner import (
    ItemsFile,
    items_path_for,
    load_eval_tasks,
    resolve_tasks,
    run_eval,
    world_task_dir,
)
from foveate.policies.base import ChatPolicy, ChatResult, Completion
from foveate.tools.store import ImageStore

ROW_KEYS = {"strategy", "family", "split", "n", "accuracy", "precision", "recall", "f1", "yes_ratio", "mean_iou"}
ROW_KEYS |= {"model_calls", "completion_tokens", "prompt_tokens", "model_latency_s", "latency_s"}
ROW_KEYS |= {"skipped", "errors", "pope_by_subtype"}
ROW_KEYS |= {"object_precision", "object_recall", "object_f1", "attribute_precision", "attribute_recall"}
ROW_KEYS |= {"attribute_f1", "hallucination", "hallucinated_caption", "caption_words"}  # caption rows (else None)


class Counting(ChatPolicy):
    """A thin wrapper over the real tiny model that counts the conversations it is asked to answer."""

    def __init__(self, inner: ChatPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.conversations = 0
        self._lock = threading.Lock()

    def chat(self, conversations, params=None):
        with self._lock:
            self.conversations += len(conversations)
        return self.inner.chat(conversations, params)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class Scripted(ChatPolicy):
    """No model: answers by keyword of the question, to check scoring through the whole runner."""

    name = "scripted"
    box_convention = "thousand"

    def chat(self, conversations, params=None):
        results = []
        for conversation in conversations:
            text = " ".join(p["text"] for p in conversation[-1]["content"] if p.get("type") == "text")
            if "explode" in text:
                raise RuntimeError("scripted failure")
            if text.startswith("Locate"):
                answer = '{"bbox_2d": [250, 500, 750, 1000]}'  # = [200, 200, 600, 400] px in an 800 × 400 image
            elif text.startswith("Is there"):
                answer = "Yes, there is."
            else:
                answer = "red"
            results.append(ChatResult([Completion(answer, 3)], 10, 0.01, self.name))
        return results


@pytest.fixture(scope="module")
def world_tasks(tmp_path_factory):
    return resolve_tasks("world:small-detail", n=8, home=tmp_path_factory.mktemp("home"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("latency_s", "model_latency_s")} for row in rows]


def test_world_task_set_is_generated_once(world_tasks, tmp_path_factory):
    assert len(world_tasks.rows) == 8
    assert world_tasks.seed == 1000 and world_tasks.key == "world:small-detail@seed1000"
    assert world_tasks.path.parent.name == "small-detail-seed1000-n8"
    meta = world_tasks.path.parent / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = resolve_tasks("world:small-detail", n=8, home=world_tasks.path.parent.parent.parent)
    assert meta.stat().st_mtime_ns == stamp  # cached, not regenerated
    assert [r["id"] for r in again.rows] == [r["id"] for r in world_tasks.rows]
    assert all(Path(r["image"]).is_file() and r["boxes"] for r in world_tasks.rows)
    with pytest.raises(FoveateError, match="unknown world preset"):
        resolve_tasks("world:nope", n=2, home=tmp_path_factory.mktemp("h2"))


def test_end_to_end_resume_and_kill_safety(world_tasks, tiny_policy, tmp_path):
    policy = Counting(tiny_policy)
    items = tmp_path / "results.items.jsonl"
    store = ImageStore(tmp_path / "images")
    strategies = ["direct", "oracle-crop"]
    kwargs = dict(items_path=items, store=store, model_id="tiny", max_new_tokens=4, max_batch=16, concurrency=8)
    seen: list[tuple[str, int, int]] = []
    walls: dict[str, dict[str, float]] = {}
    records = run_eval(world_tasks, strategies, policy, progress=lambda *a: seen.append(a), walls=walls, **kwargs)

    assert len(records) == 16 and len(_lines(items)) == 16
    assert policy.conversations == 16
    assert ("direct", 8, 8) in seen and ("oracle-crop", 8, 8) in seen
    for record in records:
        assert {"strategy", "id", "family", "split", "clutter", "prediction", "score"} <= set(record)
        assert {"model_calls", "completion_tokens", "latency_s"} <= set(record)
        assert "error" not in record, record.get("error")
        assert record["model_calls"] == 1 and 0 <= record["score"] <= 1
    oracle = [r for r in records if r["strategy"] == "oracle-crop"]
    assert all(len(r["crop_boxes"]) == 1 for r in oracle)
    # The token columns count different things: oracle-crop reads a second image (its crop), so more prompt tokens.
    direct = {r["id"]: r for r in records if r["strategy"] == "direct"}
    assert all(r["prompt_tokens"] > direct[r["id"]]["prompt_tokens"] > 0 for r in oracle)
    # Each item's wall time holds its model time (waits for the batcher come on top of it).
    assert all(0 < r["model_latency_s"] <= r["latency_s"] for r in records)
    assert set(walls) == set(strategies) and all(w["items"] == 8 and w["wall_s"] > 0 for w in walls.values())

    rows = aggregate(records, strategies)
    document = results_json(rows, task=world_tasks.name, model="tiny", n=len(world_tasks.rows))
    out = write_results(tmp_path / "results.json", document)
    loaded = json.loads(out.read_text())
    assert loaded["task"] == "world:small-detail" and loaded["model"] == "tiny" and loaded["n"] == 8
    assert all(set(row) == ROW_KEYS for row in loaded["rows"])
    overall = {r["strategy"]: r for r in loaded["rows"] if r["family"] == r["split"] == "all"}
    assert set(overall) == set(strategies) and all(r["n"] == 8 for r in overall.values())
    families = {r["family"] for r in loaded["rows"]} - {"all"}
    assert families == {r["family"] for r in world_tasks.rows}
    print_tables(rows)

    # A second run computes nothing: no model call, no new line, the same rows.
    policy.conversations = 0
    again = run_eval(world_tasks, strategies, policy, **kwargs)
    assert policy.conversations == 0
    assert len(_lines(items)) == 16
    assert aggregate(again, strategies) == rows

    # A run killed mid-write leaves a truncated last line: it is ignored, cut off and its item recomputed.
    data = items.read_bytes()
    items.write_bytes(data[:-25])
    lost = json.loads(data.splitlines()[-1])
    third = run_eval(world_tasks, strategies, policy, **kwargs)
    assert policy.conversations == 1
    lines = _lines(items)
    assert len(lines) == 16
    assert (lines[-1]["strategy"], lines[-1]["id"]) == (lost["strategy"], lost["id"])
    assert _stable(aggregate(third, strategies)) == _stable(rows)


def test_scoring_errors_and_skips_through_the_runner(tmp_path, scene_file):
    rows = [
        {"id": "g", "image": scene_file, "question": "Locate the red square.", "answers": [], "family": "grounding",
         "boxes": [[200, 200, 600, 400]]},
        {"id": "e1", "image": scene_file, "question": "Is there a red square?", "answers": ["yes"],
         "family": "existence", "subtype": "adversarial", "boxes": [[200, 200, 600, 400]]},
        {"id": "e2", "image": scene_file, "question": "Is there a blue star?", "answers": ["no"],
         "family": "existence", "subtype": "random", "boxes": []},
        {"id": "c", "image": scene_file, "question": "What color is the square?", "answers": ["red"],
         "family": "attribute", "boxes": [[200, 200, 600, 400]]},
        {"id": "x", "image": scene_file, "question": "Will it explode?", "answers": ["no"], "family": "attribute",
         "boxes": [[0, 0, 10, 10]]},
    ]  # fmt: skip
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = resolve_tasks(str(tasks_file))
    items = tmp_path / "r.items.jsonl"
    kwargs = dict(items_path=items, store=ImageStore(tmp_path / "images"), max_new_tokens=8)
    records = {(r["strategy"], r["id"]): r for r in run_eval(tasks, ["direct", "oracle-crop"], Scripted(), **kwargs)}

    assert records[("direct", "g")]["score"] == 1.0 and records[("direct", "g")]["iou"] == pytest.approx(1.0)
    assert records[("direct", "e1")]["score"] == 1.0 and records[("direct", "e2")]["score"] == 0.0
    assert records[("direct", "c")]["score"] == 1.0
    assert records[("direct", "x")]["score"] == 0.0 and "scripted failure" in records[("direct", "x")]["error"]
    assert records[("oracle-crop", "e2")]["skipped"] and records[("oracle-crop", "e2")]["score"] is None

    table = {(r["strategy"], r["family"], r["split"]): r for r in aggregate(list(records.values()))}
    existence = table[("direct", "existence", "unknown")]
    # predictions yes, yes on golds yes, no: tp 1, fp 1 → precision 0.5, recall 1, F1 2/3, yes ratio 1
    assert (existence["precision"], existence["recall"], existence["yes_ratio"]) == (0.5, 1.0, 1.0)
    assert existence["f1"] == pytest.approx(0.6667)
    assert set(existence["pope_by_subtype"]) == {"adversarial", "random"}
    assert table[("direct", "grounding", "unknown")]["mean_iou"] == 1.0
    assert table[("direct", "all", "all")]["errors"] == 1 and table[("direct", "all", "all")]["n"] == 5
    oracle_all = table[("oracle-crop", "all", "all")]
    assert (oracle_all["n"], oracle_all["skipped"]) == (4, 1)

    # Errored items are retried on the next run; everything else is reused.
    again = run_eval(tasks, ["direct", "oracle-crop"], Scripted(), **kwargs)
    assert len(_lines(items)) == 10 + 2  # the two failures were run again
    assert sum(1 for r in again if r.get("error")) == 2


@pytest.fixture()
def scene_file(tmp_path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (800, 400), "white")
    ImageDraw.Draw(image).rectangle((200, 200, 600, 400), fill="red")
    path = tmp_path / "scene.png"
    image.save(path)
    return str(path)


def test_load_eval_tasks_validation(tmp_path):
    good = {
        "id": 1,
        "image": "img/a.png",
        "question": "q",
        "answers": [],
        "family": "grounding",
        "boxes": [[0, 0, 1, 1]],
    }
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(good) + "\n\n")
    (row,) = load_eval_tasks(tmp_path)
    assert row["id"] == "1" and row["image"] == str((tmp_path / "img/a.png").resolve())
    assert row["split"] == "unknown" and row["subtype"] is None
    for bad, message in [
        ({**good, "family": "text"}, "answers"),
        ({**good, "boxes": []}, "answers"),
        ({"id": 2, "image": "a.png", "answers": ["x"]}, "missing key"),
    ]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(FoveateError, match=message):
            load_eval_tasks(path)
    path.write_text(json.dumps({**good, "answers": ["x"]}) + "\n" + json.dumps({**good, "answers": ["y"]}) + "\n")
    with pytest.raises(FoveateError, match="duplicate id"):
        load_eval_tasks(path)
    path.write_text("{not json\n")
    with pytest.raises(FoveateError, match="not valid JSON"):
        load_eval_tasks(path)
    with pytest.raises(FoveateError, match="not found"):
        load_eval_tasks(tmp_path / "missing.jsonl")


def test_items_file_keeps_complete_lines(tmp_path):
    items = ItemsFile(tmp_path / "x.items.jsonl")
    assert items.load() == []
    items.append({"a": 1})
    items.append({"a": 2})
    with open(items.path, "a") as handle:
        handle.write('{"a": 3')  # killed mid-write
    assert items.load() == [{"a": 1}, {"a": 2}]
    assert items.path.read_text() == '{"a": 1}\n{"a": 2}\n'  # the partial line was cut off
    items.append({"a": 4})
    assert items.load() == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert items_path_for("out/results.json") == Path("out/results.items.jsonl")
    assert items_path_for("results") == Path("results.items.jsonl")


def test_cli(tiny_model_dir, world_tasks, tmp_path, capsys):
    from foveate.cli import main

    out = tmp_path / "cli.json"
    argv = ["eval", "--task", str(world_tasks.path), "--strategies", "direct,oracle-crop", "--n", "3"]
    argv += ["--model", str(tiny_model_dir), "--out", str(out), "--max-new-tokens", "3"]
    main(argv)
    document = json.loads(out.read_text())
    assert document["n"] == 3 and document["strategies"] == ["direct", "oracle-crop"]
    assert document["model"].startswith(f"{tiny_model_dir}@")  # the path plus a fingerprint of the weights
    assert {(r["strategy"], r["n"]) for r in document["rows"] if r["family"] == "all" and r["split"] == "all"} == {
        ("direct", 3),
        ("oracle-crop", 3),
    }
    assert len(_lines(tmp_path / "cli.items.jsonl")) == 6
    printed = capsys.readouterr().out
    assert "all families · all" in printed and "gen tok" in printed and "prompt tok" in printed
    assert "run · wall time" in printed and "items/s" in printed
    assert set(document["run_wall"]) == {"direct", "oracle-crop"}
    assert all(w["items"] == 3 for w in document["run_wall"].values())
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--task", str(world_tasks.path), "--strategies", "direct,nope"])
    assert exit_info.value.code == 2


def test_world_task_dir(tmp_path):
    assert world_task_dir("large", 7, 50, tmp_path) == tmp_path / "tasks" / "large-seed7-n50"
