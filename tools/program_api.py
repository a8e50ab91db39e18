"""The ViperGPT-style API a visual program sees, and the sandbox child process that runs it.

This file imports only the standard library: it is executed as a fresh interpreter (``python -I -S -B
program_api.py``) by `foveate.tools.sandbox`, so the child never loads numpy, PIL, torch or the model, and holds
no pixels: an `ImagePatch` is a box in original-image pixels. Every call that needs the image or a model
(``find``, ``verify_property``, ``simple_query``, ``best_text_match``, ``ocr``, ``llm_query``) is a request to the
parent over the child's stdin/stdout (one JSON object per line); the parent crops, runs the model and answers.
Geometry (``crop``, ``overlaps_with``, the edges and centres, ``distance``) is computed here.

Coordinates follow foveate's one convention: absolute pixels of the original image, x grows right, **y grows
down** (``upper < lower``), unlike ViperGPT's lower-left origin. `API_DOC` is the text a programmer model reads.
"""

from __future__ import annotations

import json
import math
import re
import sys

API_DOC = '''\
class ImagePatch:
    """A region of the image. Coordinates are pixels of the original image; x grows right, y grows DOWN.
    Attributes: left, upper, right, lower (edges; upper < lower), width, height,
    horizontal_center, vertical_center (a patch above another has a smaller vertical_center)."""

    def find(self, object_name: str) -> list["ImagePatch"]:
        """The patches of this patch that contain an `object_name` (may be empty)."""
    def exists(self, object_name: str) -> bool:
        """True if an `object_name` is in this patch."""
    def count(self, object_name: str) -> int:
        """How many `object_name`s are in this patch."""
    def verify_property(self, object_name: str, property: str) -> bool:
        """True if the `object_name` in this patch has `property` (e.g. verify_property("square", "red"))."""
    def simple_query(self, question: str) -> str:
        """A short answer to a simple question about this patch ("What color is the circle?")."""
    def best_text_match(self, option_list: list[str]) -> str:
        """The option that best describes this patch."""
    def ocr(self) -> str:
        """The text written in this patch, top to bottom, left to right."""
    def crop(self, left: float, upper: float, right: float, lower: float) -> "ImagePatch":
        """The sub-patch with these edges (original-image pixels), clipped to the image."""
    def overlaps_with(self, left: float, upper: float, right: float, lower: float) -> bool:
        """True if this patch overlaps the box with these edges."""

def distance(a: ImagePatch | float, b: ImagePatch | float) -> float:
    """Pixels between two patches (0 if they overlap), or |a - b| for numbers."""
def bool_to_yesno(value: bool) -> str:
    """"yes" or "no"."""
def coerce_to_numeric(text: str) -> float:
    """The first number in `text` ("3 squares" -> 3)."""
def llm_query(question: str) -> str:
    """Ask a language model a question that needs knowledge, not the image."""

Write a function `execute_command(image_patch) -> str` that answers the question; `image_patch` is the whole
image. Use only these functions and plain Python (no imports). Return a short answer.'''

# Names a program may use besides its own variables and the safe builtins.
API_NAMES = ("distance", "bool_to_yesno", "coerce_to_numeric", "llm_query")
# Methods and attributes of ImagePatch.
PATCH_ATTRIBUTES = [
    "find",
    "exists",
    "count",
    "verify_property",
    "simple_query",
    "best_text_match",
    "ocr",
    "crop",
    "overlaps_with",
    "left",
    "upper",
    "right",
    "lower",
    "width",
    "height",
    "horizontal_center",
    "vertical_center",
]
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class ProgramCallError(Exception):
    """A model-backed call failed in the parent (no policy given, a model error); the message says why."""


class _Channel:
    """The child's end of the protocol: JSON lines to the parent on the real stdout, replies from stdin."""

    def __init__(self, reader, writer, max_log: int) -> None:
        self.reader, self.writer, self.max_log = reader, writer, max_log
        self.logged = 0

    def send(self, message: dict) -> None:
        self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        self.writer.flush()

    def call(self, method: str, box: list[float] | None, args: dict) -> object:
        self.send({"type": "call", "method": method, "box": box, "args": args})
        line = self.reader.readline()
        if not line:
            raise ProgramCallError(f"{method}: the host closed the channel")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ProgramCallError(str(reply.get("error", f"{method} failed")))
        return reply.get("result")

    def log(self, name: str, args: dict, result: object, boxes: list[list[float]]) -> None:
        """A local (geometry) call for the execution log; model calls are logged by the parent."""
        self.logged += 1
        if self.logged <= self.max_log:
            self.send({"type": "log", "entry": {"name": name, "args": args, "result": result, "boxes": boxes}})


_channel: _Channel | None = None  # set by main(); a program cannot name it (underscore names are refused)
_image_size: tuple[float, float] = (0.0, 0.0)


def _call(method: str, box: list[float] | None, **args: object) -> object:
    if _channel is None:
        raise ProgramCallError(f"{method}: no host to answer (the API runs inside run_program)")
    return _channel.call(method, box, args)


def _log(name: str, args: dict, result: object, *boxes: list[float]) -> None:
    if _channel is not None:
        _channel.log(name, args, result, list(boxes))


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{what} must be a finite number, got {type(value).__name__}")
    return float(value)


def _text(value: object, what: str, limit: int = 2000) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return value


class ImagePatch:
    """A box of the original image (see `API_DOC`); pixels stay in the parent."""

    __slots__ = ("left", "upper", "right", "lower")

    def __init__(self, left: float, upper: float, right: float, lower: float) -> None:
        width, height = _image_size
        left, right = max(0.0, min(left, width)), max(0.0, min(right, width))
        upper, lower = max(0.0, min(upper, height)), max(0.0, min(lower, height))
        if not (right > left and lower > upper):
            raise ValueError(f"empty patch [{left:g}, {upper:g}, {right:g}, {lower:g}] (inverted or outside)")
        self.left, self.upper, self.right, self.lower = left, upper, right, lower

    def __repr__(self) -> str:
        return f"ImagePatch({self.left:g}, {self.upper:g}, {self.right:g}, {self.lower:g})"

    @property
    def box(self) -> list[float]:
        return [self.left, self.upper, self.right, self.lower]

    width = property(lambda self: self.right - self.left)
    height = property(lambda self: self.lower - self.upper)
    horizontal_center = property(lambda self: (self.left + self.right) / 2)
    vertical_center = property(lambda self: (self.upper + self.lower) / 2)

    # ---- model-backed (answered by the parent) ------------------------------------------------------------
    def find(self, object_name: str) -> list[ImagePatch]:
        boxes = _call("find", self.box, name=_text(object_name, "object_name"))
        return [ImagePatch(*box) for box in boxes]

    def exists(self, object_name: str) -> bool:
        found = len(self.find(object_name)) > 0
        _log("exists", {"object_name": object_name}, found, self.box)
        return found

    def count(self, object_name: str) -> int:
        found = len(self.find(object_name))
        _log("count", {"object_name": object_name}, found, self.box)
        return found

    def verify_property(self, object_name: str, property: str) -> bool:
        args = {"name": _text(object_name, "object_name"), "property": _text(property, "property")}
        return bool(_call("verify_property", self.box, **args))

    def simple_query(self, question: str) -> str:
        return str(_call("simple_query", self.box, question=_text(question, "question")))

    def best_text_match(self, option_list: list[str]) -> str:
        if not isinstance(option_list, (list, tuple)) or not option_list or len(option_list) > 50:
            raise ValueError("option_list must be a list of 1 to 50 strings")
        options = [_text(option, "an option", 200) for option in option_list]
        return str(_call("best_text_match", self.box, options=options))

    def ocr(self) -> str:
        return str(_call("ocr", self.box))

    # ---- geometry (computed here) -------------------------------------------------------------------------
    def crop(self, left: float, upper: float, right: float, lower: float) -> ImagePatch:
        edges = [
            _number(v, name)
            for v, name in zip((left, upper, right, lower), ("left", "upper", "right", "lower"), strict=False)
        ]
        patch = ImagePatch(*edges)
        _log("crop", {"box": edges}, patch.box, self.box, patch.box)
        return patch

    def overlaps_with(self, left: float, upper: float, right: float, lower: float) -> bool:
        edges = [_number(v, "edge") for v in (left, upper, right, lower)]
        result = self.left < edges[2] and edges[0] < self.right and self.upper < edges[3] and edges[1] < self.lower
        _log("overlaps_with", {"box": edges}, result, self.box, edges)
        return result


def distance(a: ImagePatch | float, b: ImagePatch | float) -> float:
    if isinstance(a, ImagePatch) and isinstance(b, ImagePatch):
        dx = max(0.0, max(a.left, b.left) - min(a.right, b.right))
        dy = max(0.0, max(a.upper, b.upper) - min(a.lower, b.lower))
        result = math.hypot(dx, dy)
        _log("distance", {}, result, a.box, b.box)
        return result
    return abs(_number(a, "a") - _number(b, "b"))


def bool_to_yesno(value: object) -> str:
    return "yes" if value else "no"


def coerce_to_numeric(text: object) -> float:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    match = _NUMBER.search(str(text))
    if match is None:
        raise ValueError(f"no number in {str(text)[:80]!r}")
    value = float(match.group())
    return int(value) if value.is_integer() else value


def llm_query(question: str) -> str:
    return str(_call("llm_query", None, question=_text(question, "question")))


# ---- the child process -------------------------------------------------------------------------------------
class StepLimit(BaseException):
    """Raised by the line counter; a BaseException so a program's ``except Exception`` cannot swallow it."""


class _CappedText:
    """A stdout that keeps at most ``limit`` characters and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit, self.parts, self.size, self.dropped = limit, [], 0, 0

    def write(self, text: str) -> int:
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        more = f"\n[… {self.dropped} more characters dropped]" if self.dropped else ""
        return "".join(self.parts) + more


SAFE_BUILTIN_NAMES = [
    "abs",
    "all",
    "any",
    "bool",
    "dict",
    "divmod",
    "enumerate",
    "filter",
    "float",
    "frozenset",
    "int",
    "isinstance",
    "len",
    "list",
    "map",
    "max",
    "min",
    "range",
    "reversed",
    "round",
    "set",
    "slice",
    "sorted",
    "str",
    "sum",
    "tuple",
    "zip",
    "chr",
    "ord",
    "callable",
    "iter",
    "next",
    "repr",
    "True",
    "False",
    "None",
    "Exception",
    "ValueError",
    "TypeError",
    "KeyError",
    "IndexError",
    "ZeroDivisionError",
]


def to_json_value(value: object, budget: list[int], depth: int = 0) -> object:
    """``value`` as JSON data (patches become ``{"box": [...]}``), refusing anything deep or large."""
    if depth > 20:
        raise ValueError("the return value is nested more than 20 levels deep")
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("the return value is too large")
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
            raise ValueError("the return value is an integer too large to report")
        return value if not isinstance(value, float) or math.isfinite(value) else str(value)
    if isinstance(value, str):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise ValueError(f"the return value is too large ({len(value)} characters)")
        return value
    if isinstance(value, ImagePatch):
        return {"box": value.box}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_value(item, budget, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(k): to_json_value(v, budget, depth + 1) for k, v in value.items()}
    raise ValueError(f"the return value is a {type(value).__name__}, not text, a number, a patch or a list")


def _program_line(error: BaseException) -> str:
    tb, line = error.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<program>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line else ""


def _describe(error: BaseException, max_steps: int) -> str:
    if isinstance(error, StepLimit):
        return f"step budget exhausted: more than {max_steps} lines executed"
    if isinstance(error, RecursionError):
        return f"recursion too deep{_program_line(error)}"
    if isinstance(error, MemoryError):
        return f"memory limit reached{_program_line(error)}"
    if isinstance(error, ProgramCallError):
        return f"{error}{_program_line(error)}"
    message = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {message}{_program_line(error)}"


def run_job(job: dict, channel: _Channel) -> dict:
    """Compile and run the program of ``job``; the ``done`` message (value or error, stdout, steps)."""
    global _image_size
    _image_size = (float(job["image_size"][0]), float(job["image_size"][1]))
    stdout = _CappedText(int(job["max_output"]))
    max_steps = int(job["max_steps"])
    steps = [0]

    def safe_print(*values: object, sep: str = " ", end: str = "\n") -> None:
        stdout.write(str(sep).join(str(v) for v in values) + str(end))

    builtins = {
        name: __builtins__[name] if isinstance(__builtins__, dict) else getattr(__builtins__, name)
        for name in SAFE_BUILTIN_NAMES
    }
    builtins["print"] = safe_print
    scope = {"__builtins__": builtins, **{name: globals()[name] for name in API_NAMES}}

    def line_counter(frame, event, arg):
        if event == "line":
            steps[0] += 1
            if steps[0] > max_steps:
                raise StepLimit
        return line_counter

    def tracer(frame, event, arg):
        return line_counter if frame.f_code.co_filename == "<program>" else None

    sys.stdout = sys.stderr = stdout
    sys.setrecursionlimit(int(job["recursion_limit"]))
    try:
        code = compile(job["source"], "<program>", "exec")
        sys.settrace(tracer)
        try:
            exec(code, scope)
            command = scope.get("execute_command")
            if not callable(command):
                raise ValueError("the program defines no function execute_command(image_patch)")
            value = command(ImagePatch(0.0, 0.0, *_image_size))
        finally:
            sys.settrace(None)
        try:
            value = to_json_value(value, [int(job["max_value"])])
        except ValueError as problem:
            reason = f"the return value cannot be reported: {problem}"
            return {"type": "done", "ok": False, "error": reason, "stdout": stdout.text(), "steps": steps[0]}
        return {"type": "done", "ok": True, "value": value, "stdout": stdout.text(), "steps": steps[0]}
    except BaseException as error:  # noqa: BLE001 — every failure of the program becomes its one-line reason
        sys.settrace(None)
        reason = _describe(error, max_steps)
        return {"type": "done", "ok": False, "error": reason, "stdout": stdout.text(), "steps": steps[0]}


def main() -> None:
    """Child entry point: announce readiness, read one job line, run it, report, exit."""
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    global _channel
    _channel = _Channel(reader, writer, max_log=200)
    _channel.send({"type": "ready"})
    line = reader.readline(1 << 22)
    if not line:
        return
    job = json.loads(line)
    if job.get("self_limits"):  # no prlimit on this platform: the parent asked the child to limit itself
        import resource

        for name, value in job["self_limits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
    _channel.max_log = int(job.get("max_log", 200))
    try:
        done = run_job(job, _channel)
        done["log_dropped"] = max(0, _channel.logged - _channel.max_log)
        _channel.send(done)
    except MemoryError:
        _channel.send({"type": "done", "ok": False, "error": "memory limit reached while reporting", "steps": 0})


if __name__ == "__main__":
    main()
