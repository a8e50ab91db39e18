"""``foveate caption``: inputs, bad images as error rows, resuming by id, exactly-once output after SIGKILLs,
Parquet in and out, and the Ray Data pipeline on a real local Ray cluster (``ray start``)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from foveate.config import FoveateConfig
from foveate.errors import FoveateError
from foveate.jobs.caption import CaptionSpec, decode_batch
from foveate.jobs.job import run_caption_job
from foveate.jobs.ray_caption import actor_cpus
from foveate.jobs.sinks import JsonlSink, ParquetSink, make_sink
from foveate.jobs.sources import INPUT_SCHEMA, resolve_source

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "world" / "images"


def huge_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header claiming ``width × height`` pixels (2.5 G by default) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def add_bad_files(folder: Path) -> dict[str, str]:
    """A truncated PNG, a text file named .jpg and an oversized PNG; returns id → a word its error must hold."""
    data = (EXAMPLES / "large-7-000000.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image, just text\n")
    (folder / "huge.png").write_bytes(huge_png())
    return {"corrupt.png": "truncated", "notes.jpg": "not a", "huge.png": "pixels"}


def noise_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img-{i:03d}.png")


def spec_for(model_dir: Path, home: Path, **overrides) -> CaptionSpec:
    config = FoveateConfig(model=str(model_dir), home=str(home))
    return CaptionSpec(config=config, max_new_tokens=4, **overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "images"
    shutil.copytree(EXAMPLES, folder)
    return folder, add_bad_files(folder)


# ---- inputs -------------------------------------------------------------------------------------------------
def test_sources_ids(tmp_path: Path) -> None:
    noise_images(tmp_path / "f" / "sub", 2)
    (tmp_path / "f" / "a.PNG").write_bytes((tmp_path / "f" / "sub" / "img-000.png").read_bytes())
    (tmp_path / "f" / "readme.txt").write_text("skip me")
    (tmp_path / "f" / ".hidden").mkdir()
    (tmp_path / "f" / ".hidden" / "x.png").write_bytes(b"skip me too")
    folder = resolve_source(str(tmp_path / "f"))
    assert folder.ids == ["a.PNG", "sub/img-000.png", "sub/img-001.png"]  # any case; hidden and non-images skipped
    assert all(Path(path).is_absolute() for path in folder.paths.values())
    pattern = resolve_source(str(tmp_path / "f" / "*"))  # a glob takes what it matches, images or not
    assert [Path(key).name for key in pattern.ids] == ["a.PNG", "readme.txt"]
    tasks = tmp_path / "tasks.jsonl"
    rows = [
        {"id": "q0", "image": "f/a.PNG"},
        {"id": "q1", "image": "f/a.PNG"},
        {"id": "q2", "image": "f/sub/img-001.png"},
    ]
    tasks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task_source = resolve_source(str(tasks))
    assert task_source.ids == ["f/a.PNG", "f/sub/img-001.png"]  # each image once
    assert task_source.limited(1).ids == ["f/a.PNG"]
    with pytest.raises(FoveateError, match="input not found"):
        resolve_source(str(tmp_path / "missing"))
    pq.write_table(pa.table({"id": ["x", "x"], "image": [b"1", b"2"]}), tmp_path / "dup.parquet")
    with pytest.raises(FoveateError, match="duplicate id 'x'"):
        resolve_source(str(tmp_path / "dup.parquet"))
    pq.write_table(pa.table({"image": [b"1"]}), tmp_path / "noid.parquet")
    with pytest.raises(FoveateError, match="needs an 'id'"):
        resolve_source(str(tmp_path / "noid.parquet"))


def test_decode_batch_turns_bad_images_into_error_rows(image_folder) -> None:
    folder, bad = image_folder
    source = resolve_source(str(folder))
    [batch] = list(source.batches(100, set(source.ids)))
    decoded = {row["id"]: row for row in decode_batch(batch, max_pixels=40_000_000).to_pylist()}
    for key, word in bad.items():
        assert decoded[key]["image"] is None and word in decoded[key]["error"], decoded[key]["error"]
        assert "\n" not in decoded[key]["error"]
    for key in source.ids:
        if key not in bad:
            assert decoded[key]["error"] is None and decoded[key]["image"] == (folder / key).read_bytes()
    gone = pa.Table.from_pylist([{"id": "gone", "path": str(folder / "gone.png"), "image": None}], schema=INPUT_SCHEMA)
    assert "No such file" in decode_batch(gone, None).to_pylist()[0]["error"]


def test_actor_cpus_leave_room_for_decoding() -> None:
    assert actor_cpus(2, 2) == 0.5  # two actors take one of two CPUs: decode tasks still run (RESEARCH.md §7)
    assert actor_cpus(2, 4) == 0.43  # (2 - 0.25) / 4, rounded down
    assert actor_cpus(2, 4) * 4 + 0.25 <= 2
    with pytest.raises(ValueError):
        actor_cpus(0.25, 1)


# ---- the local runner ---------------------------------------------------------------------------------------
def test_local_job_error_rows_and_second_run(image_folder, tiny_model_dir, tmp_path) -> None:
    folder, bad = image_folder
    out = tmp_path / "caps.jsonl"
    spec = spec_for(tiny_model_dir, tmp_path / "home")
    source = resolve_source(str(folder))
    summary = run_caption_job(source, JsonlSink(out), spec, batch_size=4)
    assert (summary.done, summary.errors, summary.skipped, summary.mode) == (6, 3, 0, "local")
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert sorted(rows) == sorted(source.ids)
    for key, row in rows.items():
        assert row["strategy"] == "direct" and row["prompt"] == "Describe the image in detail."
        if key in bad:
            assert row["caption"] is None and bad[key] in row["error"]
            assert row["model_calls"] == 0
        else:
            assert row["error"] is None and isinstance(row["caption"], str) and row["model"] == "tiny"
            assert row["model_calls"] == 1 and 1 <= row["completion_tokens"] <= 4 and row["latency_s"] > 0
    again = run_caption_job(source, JsonlSink(out), spec, batch_size=4)
    assert (again.done, again.skipped) == (0, 6)  # a second run does nothing new
    assert len(read_jsonl(out)) == 6
    with pytest.raises(FoveateError, match="choose another --out"):  # another prompt never mixes into this file
        run_caption_job(source, JsonlSink(out), spec_for(tiny_model_dir, tmp_path / "home", prompt="Other?"))


def test_resume_skips_done_ids_and_recomputes_a_cut_line(tiny_model_dir, tmp_path) -> None:
    noise_images(tmp_path / "imgs", 5)
    out = tmp_path / "caps.jsonl"
    spec = spec_for(tiny_model_dir, tmp_path / "home")
    source = resolve_source(str(tmp_path / "imgs"))
    first = run_caption_job(source.limited(3), JsonlSink(out), spec, batch_size=2)
    assert first.done == 3
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a kill cut the third line
    second = run_caption_job(source, JsonlSink(out), spec, batch_size=2)
    assert (second.skipped, second.done) == (2, 3)  # the cut row counts as not done
    ids = [row["id"] for row in read_jsonl(out)]
    assert sorted(ids) == sorted(source.ids) and len(ids) == len(set(ids))


def test_retry_errors_rewrites_without_error_rows(tiny_model_dir, tmp_path) -> None:
    noise_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "late.png").write_bytes(b"not yet")
    out = tmp_path / "caps.jsonl"
    spec = spec_for(tiny_model_dir, tmp_path / "home")
    run_caption_job(resolve_source(str(tmp_path / "imgs")), JsonlSink(out), spec)
    assert {row["id"]: row["error"] is not None for row in read_jsonl(out)}["late.png"]
    shutil.copy(tmp_path / "imgs" / "img-000.png", tmp_path / "imgs" / "late.png")  # the file got fixed
    assert run_caption_job(resolve_source(str(tmp_path / "imgs")), JsonlSink(out), spec).done == 0
    fixed = run_caption_job(resolve_source(str(tmp_path / "imgs")), JsonlSink(out), spec, retry_errors=True)
    assert fixed.done == 1 and fixed.errors == 0
    rows = read_jsonl(out)
    assert len(rows) == 3 and all(row["error"] is None for row in rows)


def test_one_job_per_output(tmp_path) -> None:
    first = JsonlSink(tmp_path / "caps.jsonl")
    first.open()
    try:
        with pytest.raises(FoveateError, match="another job is writing"):
            JsonlSink(tmp_path / "caps.jsonl").open()
    finally:
        first.close()
    second = JsonlSink(tmp_path / "caps.jsonl")
    assert second.open() == {}
    second.close()


def test_parquet_round_trip(tiny_model_dir, tmp_path) -> None:
    """Parquet in (ids + encoded bytes, one corrupt, one Hugging Face style struct column) → Parquet parts out."""
    names = sorted(path.name for path in EXAMPLES.iterdir())
    images = [{"bytes": (EXAMPLES / name).read_bytes(), "path": name} for name in names] + [
        {"bytes": b"\x89PNG broken", "path": "broken.png"}
    ]
    ids = [f"row-{i}" for i in range(len(images))]
    pq.write_table(pa.table({"id": ids, "image": images, "extra": list(range(len(images)))}), tmp_path / "in.parquet")
    out = tmp_path / "caps.parquet"
    spec = spec_for(tiny_model_dir, tmp_path / "home")
    source = resolve_source(str(tmp_path / "in.parquet"))
    summary = run_caption_job(source, make_sink(out), spec, batch_size=3)
    assert (summary.done, summary.errors) == (4, 1)
    table = pq.read_table(out)  # the directory reads as one dataset; the lock file is ignored
    assert table.schema.names[:6] == ["id", "path", "strategy", "prompt", "caption", "error"]
    rows = {row["id"]: row for row in table.to_pylist()}
    assert sorted(rows) == sorted(ids)
    assert rows["row-3"]["error"] and all(rows[key]["caption"] for key in ids[:3])
    assert run_caption_job(source, make_sink(out), spec).done == 0


def test_parquet_sink_ignores_and_removes_a_cut_part(tmp_path) -> None:
    sink = ParquetSink(tmp_path / "caps.parquet", rows_per_part=2)
    sink.open()
    sink.write([{"id": "a", "strategy": "direct"}, {"id": "b", "strategy": "direct"}])
    sink.close()
    (tmp_path / "caps.parquet" / "part-x-00009.parquet.tmp").write_bytes(b"PAR1 cut short")
    again = ParquetSink(tmp_path / "caps.parquet")
    assert sorted(again.open()) == ["a", "b"]
    again.close()
    assert not list((tmp_path / "caps.parquet").glob("*.tmp"))


# ---- killed jobs ----------------------------------------------------------------------------------------------
def _caption_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "foveate.cli", "caption", *args]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


IMAGES = 64  # inputs of the kill test, the corrupt one included


@pytest.mark.slow
def test_sigkill_three_times_then_resume_gives_every_image_once(tiny_model_dir, tmp_path) -> None:
    """SIGKILL the job at seeded random points (during start-up or after a random number of written rows, plus a
    random delay so the kill can land mid-batch or mid-write), three times; the rerun completes the output with
    every input exactly once and the corrupt image as an error row."""
    rng = random.Random(34)
    folder = tmp_path / "imgs"
    noise_images(folder, IMAGES - 1)  # enough that three kills cannot finish the job on an idle machine
    (folder / "zz-corrupt.png").write_bytes((folder / "img-000.png").read_bytes()[:100])
    out = tmp_path / "caps.jsonl"
    env = {**os.environ, "FOVEATE_HOME": str(tmp_path / "home")}
    args = _caption_command(str(folder), "--out", str(out), "--model", str(tiny_model_dir))
    args += ["--max-new-tokens", "8", "--batch-size", "2"]
    kills = []
    for round_ in range(3):
        before = _lines(out)
        job = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_rows = rng.choice([0, 1, 3, 5])
            if wait_rows == 0:
                time.sleep(rng.uniform(0.5, 3.0))  # during start-up or model loading
            else:
                deadline = time.monotonic() + 120
                while _lines(out) < before + wait_rows and job.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.15))
            assert job.poll() is None, f"round {round_}: the job finished before the kill; use more images"
            job.send_signal(signal.SIGKILL)
        finally:
            job.kill()
            job.wait()
        kills.append((wait_rows, before, _lines(out)))
    assert kills[-1][2] < IMAGES, kills  # the kills left work to do
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)  # every line complete and valid JSON (a cut line was truncated away)
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(resolve_source(str(folder)).ids) and len(ids) == len(set(ids)) == IMAGES, kills
    errors = {row["id"]: row["error"] for row in rows if row["error"]}
    assert list(errors) == ["zz-corrupt.png"] and "truncated" in errors["zz-corrupt.png"]
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"nothing new; {IMAGES} of {IMAGES} were already" in again.stdout
    assert len(read_jsonl(out)) == IMAGES


# ---- a real local Ray cluster ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_under(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker`` (our cluster's private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_cluster():
    """``ray start --head --block`` with 4 logical CPUs on a free port and a private temp dir; stopped at the end
    by SIGTERM to its process group, then any process still naming the temp dir is killed by PID."""
    temp_dir = tempfile.mkdtemp(prefix="fovray")  # short: Ray's socket paths live below it
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", "4"]
    command += ["--port", str(port), "--temp-dir", temp_dir, "--include-dashboard", "false"]
    command += ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, head.stderr.read().decode()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "ray start did not open its port"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in _pids_under(temp_dir):  # orphans (e.g. agents after a hard stop)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_cluster_two_workers_kill_resume_and_parquet(ray_cluster, image_folder, tiny_model_dir, tmp_path) -> None:
    """On a real ``ray start`` cluster: ``--workers 2`` over the folder with bad images, the driver SIGKILLed once
    after its first rows and rerun (every image once); then Parquet in → Parquet out through ``read_parquet``."""
    address, env = ray_cluster
    env = {**env, "FOVEATE_HOME": str(tmp_path / "home")}
    folder, bad = image_folder
    noise_images(folder, 10)
    out = tmp_path / "caps.jsonl"
    args = _caption_command(str(folder), "--out", str(out), "--model", str(tiny_model_dir), "--max-new-tokens", "4")
    args += ["--ray-address", address, "--workers", "2", "--batch-size", "1"]
    job = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _lines(out) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.poll() is None, job.stderr.read().decode()[-2000:]
    job.kill()
    job.wait()
    killed_at = _lines(out)
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "[ray (2 workers)]" in finished.stdout
    rows = read_jsonl(out)
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(resolve_source(str(folder)).ids) and len(ids) == len(set(ids)), killed_at
    assert {row["id"] for row in rows if row["error"]} == set(bad)

    table = pa.table({"id": ids, "path": [str(folder / key) for key in ids]})  # Parquet rows that point at files
    pq.write_table(table, tmp_path / "in.parquet")
    parquet_args = _caption_command(str(tmp_path / "in.parquet"), "--out", str(tmp_path / "caps.parquet"))
    parquet_args += [
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
        "--ray-address",
        address,
        "--workers",
        "2",
    ]
    result = subprocess.run(parquet_args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    back = pq.read_table(tmp_path / "caps.parquet").to_pylist()
    assert sorted(row["id"] for row in back) == sorted(ids)
    assert {row["id"] for row in back if row["error"]} == set(bad)


def test_cli_caption_twice_and_a_missing_input(tiny_model_dir, tmp_path, capsys) -> None:
    from foveate.cli import main

    noise_images(tmp_path / "imgs", 2)
    args = ["caption", str(tmp_path / "imgs"), "--out", str(tmp_path / "caps.jsonl"), "--model", str(tiny_model_dir)]
    args += ["--max-new-tokens", "2", "--limit", "1"]
    main(args)
    assert "1 new (0 error rows)" in capsys.readouterr().out
    main(args)
    assert "nothing new; 1 of 1 were already in" in capsys.readouterr().out
    assert [row["id"] for row in read_jsonl(tmp_path / "caps.jsonl")] == ["img-000.png"]
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.jsonl")])
    assert exit_info.value.code == 2
    assert "input not found" in capsys.readouterr().err


def test_http_backend_failures_are_error_rows_and_retried(tiny_policy, tmp_path) -> None:
    """Over real HTTP (tests/openai_server.py on loopback): a server answering garbage gives each image an error
    row and the job finishes; ``retry_errors`` with a working server captions them, the corrupt file stays an error."""
    from openai_server import make_app, serve_in_thread

    noise_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    source = resolve_source(str(tmp_path / "imgs"))
    out = tmp_path / "caps.jsonl"

    def spec(url: str) -> CaptionSpec:
        config = FoveateConfig(endpoint=url, endpoint_model="tiny", home=str(tmp_path / "home"))
        return CaptionSpec(config=config, max_new_tokens=3)

    with serve_in_thread(make_app(tiny_policy, "tiny", malformed="html")) as url:
        broken = run_caption_job(source, JsonlSink(out), spec(url))
    assert (broken.done, broken.errors) == (3, 3)
    reasons = {row["id"]: row["error"] for row in read_jsonl(out)}
    assert "PolicyError" in reasons["img-000.png"] and "\n" not in reasons["img-000.png"]
    with serve_in_thread(make_app(tiny_policy, "tiny")) as url:
        fixed = run_caption_job(source, JsonlSink(out), spec(url), retry_errors=True)
    assert (fixed.done, fixed.errors) == (3, 1)
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert len(rows) == 3 and rows["bad.png"]["error"] and rows["img-001.png"]["model"] == "openai:tiny"
    assert rows["img-000.png"]["caption"] is not None


@pytest.mark.slow
def test_ray_private_local_cluster_parquet_bytes(tiny_model_dir, tmp_path) -> None:
    """Without --ray-address: a private local Ray (started and shut down by the job, its temp dir removed), Parquet
    rows carrying encoded bytes through ``read_parquet``, two actors, a corrupt row as an error row."""
    import ray

    noise_images(tmp_path / "imgs", 6)
    names = sorted(path.name for path in (tmp_path / "imgs").iterdir())
    data = [(tmp_path / "imgs" / name).read_bytes() for name in names] + [b"GIF89a broken"]
    ids = [*names, "broken.gif"]
    pq.write_table(pa.table({"id": ids, "image": data}), tmp_path / "in.parquet")
    source = resolve_source(str(tmp_path / "in.parquet"))
    before = set(Path(tempfile.gettempdir()).glob("fov-ray-*"))
    summary = run_caption_job(
        source,
        make_sink(tmp_path / "out.parquet"),
        spec_for(tiny_model_dir, tmp_path / "home"),
        workers=2,
        batch_size=2,
    )
    assert (summary.done, summary.errors, summary.mode) == (7, 1, "ray (2 workers)")
    assert not ray.is_initialized() and set(Path(tempfile.gettempdir()).glob("fov-ray-*")) <= before
    rows = {row["id"]: row for row in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    assert sorted(rows) == sorted(ids) and rows["broken.gif"]["error"]
    assert all(rows[name]["caption"] is not None and rows[name]["worker"] for name in names)
