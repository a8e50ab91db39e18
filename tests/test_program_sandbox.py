"""The sandbox of visual programs (tools/sandbox.py, tools/program.py): hostile programs are refused or stopped
with a clear one-line ``.error`` and leave the host unharmed; legitimate programs run.

Where a test needs ``find`` it uses `WorldGrounder`, which reads the world's exact ground-truth boxes: those tests
are about the program machinery (boxes in, patches out, the log), not about grounding quality.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from foveate.tools import sandbox
from foveate.tools.boxes import Box
from foveate.tools.grounding import Grounder, Grounding
from foveate.tools.program import run_program

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "examples" / "world"
IMAGE = Image.new("RGB", (640, 480), "gray")


def program(body: str) -> str:
    """``body`` (lines indented by four spaces) as the body of execute_command."""
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return f"def execute_command(image_patch):\n{lines}\n"


class WorldGrounder:
    """Ground truth for tests of the program machinery: objects of one world scene whose "color shape" (or shape)
    matches the phrase, best first by size."""

    def __init__(self, scene: dict) -> None:
        self.objects = scene["objects"]
        self.calls: list[list[str]] = []

    def ground(self, image, phrases):
        self.calls.append(list(phrases))
        out = []
        for phrase in phrases:
            words = phrase.lower().split()
            found = [
                o for o in self.objects if o["shape"] == words[-1] and (len(words) == 1 or words[-2] == o["color"])
            ]
            # the grounder sees a crop: boxes are offsets inside it only when the crop is the whole image
            found = [o for o in found if o["box"][2] <= image.width and o["box"][3] <= image.height]
            out.append([Grounding(Box(*o["box"]), 1.0, phrase) for o in found])
        return out


def scene(scene_id: str) -> dict:
    for line in (WORLD / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["id"] == scene_id:
            return row
    raise KeyError(scene_id)


# ---- static refusals ---------------------------------------------------------------------------------------
REFUSED = {
    "subclasses chain": ("return ().__class__.__bases__[0].__subclasses__()", "attributes starting with '_'"),
    "patch dict": ("return image_patch.__dict__", "attributes starting with '_'"),
    "function globals": ("def f():\n    return 1\nreturn f.__globals__", "attributes starting with '_'"),
    "generator frame": ("g = (x for x in [1])\nreturn g.gi_frame", "attribute .gi_frame"),
    "generator code": ("g = (x for x in [1])\nreturn g.gi_code", "attribute .gi_code"),
    "format attack": ("return '{0.__class__}'.format(image_patch)", "attribute .format"),
    "format_map attack": ("return '{p.find}'.format_map({'p': image_patch})", "attribute .format_map"),
    "method self": ("return image_patch.find.self", "attribute .self"),
    "import": ("import os\nreturn 1", "import statements are not allowed"),
    "import from": ("from os import *\nreturn 1", "import statements are not allowed"),
    "import as": ("import os.path as p\nreturn 1", "import statements are not allowed"),
    "dunder import": ("return __import__('os')", "names starting with '_'"),
    "importlib": ("return importlib.import_module('os')", "is not available"),
    "builtins module": ("return builtins", "name 'builtins' is not available"),
    "open": ("return open('/etc/passwd')", "name 'open' is not available"),
    "eval": ("return eval('1+1')", "name 'eval' is not available"),
    "exec": ("exec('x=1')\nreturn 1", "name 'exec' is not available"),
    "compile": ("return compile('1', 'f', 'eval')", "name 'compile' is not available"),
    "getattr": ("return getattr(image_patch, '__class__')", "name 'getattr' is not available"),
    "setattr": ("setattr(image_patch, 'left', 1)\nreturn 1", "name 'setattr' is not available"),
    "globals": ("return globals()", "name 'globals' is not available"),
    "locals": ("return locals()", "name 'locals' is not available"),
    "vars": ("return vars()", "name 'vars' is not available"),
    "type": ("return type(image_patch)", "name 'type' is not available"),
    "object": ("return object.mro()", "is not available"),
    "breakpoint": ("breakpoint()\nreturn 1", "name 'breakpoint' is not available"),
    "input": ("return input()", "name 'input' is not available"),
    "help": ("return help()", "name 'help' is not available"),
    "dir": ("return dir(image_patch)", "name 'dir' is not available"),
    "class with dunder": ("class A:\n    pass\nreturn A", "class definitions are not allowed"),
    "global": ("global x\nreturn 1", "global is not allowed"),
    "with": ("with x:\n    pass\nreturn 1", "with statements are not allowed"),
    "generator function": ("def g():\n    yield 1\nreturn list(g())", "yield"),
    "match class pattern": ("match image_patch:\n    case x:\n        return 1", "match statements are not allowed"),
    "decorator": ("@print\ndef f():\n    pass\nreturn 1", "decorators are not allowed"),
    "bare except": ("try:\n    pass\nexcept:\n    pass\nreturn 1", "bare except"),
    "underscore name": ("_x = 1\nreturn _x", "names starting with '_'"),
    "underscore keyword": ("return dict(__class__=1)", "names starting with '_'"),
    "fork": ("return posix.fork()", "is not available"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_programs_are_refused_before_running(name: str) -> None:
    body, reason = REFUSED[name]
    result = run_program(program(body), IMAGE)
    assert not result.ok and result.error.startswith("refused: ")
    assert reason in result.error and "\n" not in result.error
    assert result.steps == 0 and result.log == []  # nothing ran


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("x = 1\n", "no function execute_command"),
        ("def execute_command(image_patch)\n    return 1\n", "syntax error"),
        ("def execute_command(image_patch):\n    return " + "-" * 200_000 + "1\n", "longer than"),
        ("def execute_command(image_patch):\n    return " + "-" * 15_000 + "1\n", "refused"),
        ("def execute_command(image_patch):\n    return " + "(" * 1000 + "1" + ")" * 1000 + "\n", "refused"),
    ],
)
def test_malformed_sources_are_refused_with_a_reason(source: str, reason: str) -> None:
    result = run_program(source, IMAGE)
    assert not result.ok and reason in result.error and "\n" not in result.error


# ---- run-time limits ---------------------------------------------------------------------------------------
STOPPED = {
    "endless loop": ("while True:\n    pass", {}, "step budget exhausted"),
    "loop swallowing the stop": (
        "while True:\n    try:\n        while True:\n            pass\n    except Exception:\n        pass",
        {},
        "step budget exhausted",
    ),
    "memory bomb string": ("return len('a' * 10**10)", {}, "memory limit reached"),
    "memory bomb list": ("x = [0] * 10**9\nreturn 1", {}, "memory limit reached"),
    "doubling string": ("s = 'a'\nwhile True:\n    s = s + s", {}, "memory limit reached"),
    "deep recursion": ("def f(n):\n    return f(n + 1)\nreturn f(0)", {}, "recursion too deep"),
    "huge return value": ("return 'a' * 10**6", {}, "return value cannot be reported"),
    "huge return list": ("return list(range(10**5))", {}, "return value cannot be reported"),
    "endless printing": ("while True:\n    print('x' * 1000)", {}, "step budget exhausted"),
    "loop in C": ("return sum(range(10**13))", {"timeout_s": 1.0}, "timeout"),
    "loop in finally": (
        "try:\n    while True:\n        pass\nfinally:\n    while True:\n        pass",
        {"timeout_s": 1.0, "max_steps": 1000},
        "timeout",
    ),
    "big integer": ("x = 7\nwhile True:\n    x = x * x", {"timeout_s": 2.0}, "timeout"),
}


@pytest.mark.parametrize("name", sorted(STOPPED))
def test_resource_exhaustion_is_stopped_with_a_clear_error(name: str, tmp_path: Path, monkeypatch) -> None:
    body, limits, reason = STOPPED[name]
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = run_program(program(body), IMAGE, **limits)
    assert time.monotonic() - started < limits.get("timeout_s", 10.0) + 5  # bounded in time
    assert not result.ok and reason in result.error and "\n" not in result.error
    assert list(tmp_path.iterdir()) == []  # nothing written where the host works


def test_print_flooding_is_capped_and_the_program_still_answers() -> None:
    result = run_program(program("for i in range(1000):\n    print('x' * 1000)\nreturn 'done'"), IMAGE)
    assert result.ok and result.value == "done"
    assert len(result.stdout) < 11_000 and "991000 more characters dropped" in result.stdout


def test_model_backed_calls_are_capped(tmp_path: Path) -> None:
    grounder = WorldGrounder(scene("large-7-000000"))
    body = "n = 0\nfor i in range(10):\n    n = n + image_patch.count('triangle')\nreturn n"
    result = run_program(program(body), IMAGE, grounder=grounder, max_calls=3)
    assert not result.ok and "more than 3 model-backed calls" in result.error
    assert len(grounder.calls) == 3  # the fourth was refused without reaching the grounder


@pytest.mark.slow
def test_the_host_is_unharmed_by_a_battery_of_hostile_programs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cwd, pid, environ = os.getcwd(), os.getpid(), dict(os.environ)
    for body, limits, _ in STOPPED.values():
        run_program(program(body), IMAGE, **{**limits, "timeout_s": min(limits.get("timeout_s", 2.0), 2.0)})
    assert (os.getcwd(), os.getpid(), dict(os.environ)) == (cwd, pid, environ)
    assert list(tmp_path.iterdir()) == []
    result = run_program(program("return image_patch.width"), IMAGE)  # still responsive
    assert result.ok and result.value == 640


def test_kernel_limits_hold_when_the_static_check_is_bypassed(tmp_path: Path, monkeypatch) -> None:
    """Defence in depth: with the static check switched off, the run-time builtins and the kernel limits still
    stop imports, open() and a subclass-chain escape to the os module from creating a file."""
    monkeypatch.setattr(sandbox, "check_program", lambda source: None)
    target = tmp_path / "escaped.txt"
    assert "ImportError" in run_program(program("import os\nreturn 1"), IMAGE).error
    assert "NameError" in run_program(program(f"return open({str(target)!r}, 'w')"), IMAGE).error
    escape = (
        "importer = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'BuiltinImporter'][0]\n"
        "posix = importer.load_module('posix')\n"
        f"return posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)"
    )
    result = run_program(program(escape), IMAGE)
    assert not result.ok and "Too many open files" in result.error
    assert not target.exists()


# ---- legitimate programs -----------------------------------------------------------------------------------
def test_a_geometry_only_program_runs_without_a_policy_and_logs_its_calls() -> None:
    body = """
left = image_patch.crop(0, 0, image_patch.width / 2, image_patch.height)
right = image_patch.crop(image_patch.horizontal_center, 0, image_patch.right, image_patch.lower)
gap = distance(left, right)
return [left.width, right.left, gap, left.overlaps_with(100, 100, 400, 200), bool_to_yesno(gap == 0),
        coerce_to_numeric('about 3.5 px')]
"""
    result = run_program(program(body), IMAGE)
    assert result.ok, result.error
    assert result.value == [320.0, 320.0, 0.0, True, "yes", 3.5]
    assert [entry["name"] for entry in result.log] == ["crop", "crop", "distance", "overlaps_with"]
    assert result.log[0]["boxes"] == [[0.0, 0.0, 640.0, 480.0], [0.0, 0.0, 320.0, 480.0]]


def test_model_backed_calls_without_a_model_fail_with_a_clear_error() -> None:
    for body, needs in [
        ("return image_patch.simple_query('What color?')", "simple_query needs a vision-language model"),
        ("return image_patch.exists('cat')", "find needs a grounder"),
        ("return llm_query('Capital of France?')", "llm_query needs a language model"),
    ]:
        result = run_program(program(body), IMAGE)
        assert not result.ok and needs in result.error and "(line 2)" in result.error


def test_find_maps_grounded_boxes_to_patches_and_the_log_shows_them() -> None:
    row = scene("large-7-000000")
    image = Image.open(WORLD / row["image"])
    body = """
triangles = image_patch.find('triangle')
triangles = sorted(triangles, key=lambda p: p.horizontal_center)
return {'n': len(triangles), 'leftmost': triangles[0], 'any_blue': image_patch.exists('blue triangle')}
"""
    result = run_program(program(body), image, grounder=WorldGrounder(row))
    triangles = [o["box"] for o in row["objects"] if o["shape"] == "triangle"]
    assert result.ok, result.error
    assert result.value["n"] == len(triangles)
    assert result.value["leftmost"] == {"box": [float(v) for v in min(triangles, key=lambda b: b[0] + b[2])]}
    assert result.value["any_blue"] is True
    find = result.log[0]
    assert find["name"] == "find" and find["args"] == {"name": "triangle"}
    assert sorted(find["boxes"][1:]) == sorted([float(v) for v in b] for b in triangles)
    assert [entry["name"] for entry in result.log] == ["find", "find", "exists"]


def test_ocr_reads_the_world_labels() -> None:
    row = scene("large-7-000000")
    result = run_program(program("return image_patch.crop(540, 90, 672, 180).ocr()"), WORLD / row["image"])
    assert result.ok and result.value == "CG"  # the label of o3, "CG", at [559, 110, 642, 154]
    assert result.log[-1]["name"] == "ocr" and len(result.log[-1]["boxes"]) == 2


@pytest.mark.slow
def test_simple_query_and_verify_property_run_on_the_demo_model(demo_policy) -> None:
    row = scene("large-7-000000")
    body = (
        "return [image_patch.simple_query('What shape is the large blue object?'), "
        "image_patch.verify_property('triangle', 'blue')]"
    )
    result = run_program(program(body), WORLD / row["image"], policy=demo_policy, timeout_s=30)
    assert result.ok, result.error
    answer, verified = result.value
    assert isinstance(answer, str) and answer and isinstance(verified, bool)
    assert [entry["name"] for entry in result.log] == ["simple_query", "verify_property"]
    assert all("reply" in entry and entry["boxes"] == [[0.0, 0.0, 672.0, 672.0]] for entry in result.log)


@pytest.mark.slow
def test_the_default_grounder_of_a_white_box_policy_is_attention(demo_policy) -> None:
    row = scene("large-7-000000")
    result = run_program(program("return image_patch.find('blue triangle')"), WORLD / row["image"], policy=demo_policy)
    assert result.ok, result.error
    assert isinstance(result.value, list) and len(result.value) <= 1  # one attention window, or none on "no"
    assert result.log[0]["name"] == "find"


def test_grounding_protocol_is_runtime_checkable() -> None:
    assert isinstance(WorldGrounder(scene("large-7-000000")), Grounder)


def test_without_prlimit_the_child_limits_itself(monkeypatch, tmp_path: Path) -> None:
    """Platforms without ``resource.prlimit`` (macOS): the child sets the same kernel limits on itself first."""
    import resource

    monkeypatch.delattr(resource, "prlimit")
    assert "memory limit reached" in run_program(program("return len('a' * 10**10)"), IMAGE).error
    monkeypatch.setattr(sandbox, "check_program", lambda source: None)
    target = tmp_path / "escaped.txt"
    escape = (
        "importer = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'BuiltinImporter'][0]\n"
        f"return importer.load_module('posix').open({str(target)!r}, 65)"
    )
    assert "Too many open files" in run_program(program(escape), IMAGE).error and not target.exists()
