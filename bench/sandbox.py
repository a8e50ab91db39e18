"""What the visual-program sandbox costs: a sandboxed run vs the same program exec'd in-process (unsafe).

    python bench/sandbox.py

Four programs, each run ``REPEATS`` times both ways: ``empty`` (the fixed cost: spawning and limiting the child
interpreter, the handshake), ``geometry`` (a few crops and comparisons: the child's
start-up dominates), ``loop`` (a 20 000-iteration Python loop: the line counter's cost), and ``calls`` (10 model-
backed calls answered by a host-side handler that returns at once: the pipe round-trips). The in-process
baseline execs the same source with the same API functions and no limits, as ViperGPT's reference does. The table
shows the median wall time of each, the sandbox's time over the empty program's, and the ratio sandbox /
in-process. For scale: one model call of the tiny test model takes tens of ms, a real VLM's seconds. Prints only.
"""

from __future__ import annotations

import statistics

from PIL import Image
from rich.console import Console
from rich.table import Table
from timing import timed  # bench/timing.py

from foveate.tools import program_api
from foveate.tools.program import run_program
from foveate.tools.sandbox import Limits, execute

REPEATS = 7
PROGRAMS = {
    "empty": "def execute_command(image_patch):\n    return 1\n",
    "geometry": """
def execute_command(image_patch):
    left = image_patch.crop(0, 0, image_patch.width / 2, image_patch.height)
    right = image_patch.crop(image_patch.horizontal_center, 0, image_patch.right, image_patch.lower)
    return bool_to_yesno(distance(left, right) == 0 and left.overlaps_with(0, 0, 10, 10))
""",
    "loop": """
def execute_command(image_patch):
    total = 0
    for i in range(20000):
        total = total + i % 7
    return total
""",
    "calls": """
def execute_command(image_patch):
    return sum(len(image_patch.find('square')) for i in range(10))
""",
}


def handler(method, box, args):
    return [[1, 1, 5, 5]], {"name": method, "args": args, "result": 1, "boxes": [box]}


class InProcess:
    """The unsafe baseline's host end: the same calls, answered directly."""

    def call(self, method, box, args):
        return handler(method, box, args)[0]

    def log(self, *args):
        pass


def in_process(source: str, size: tuple[int, int]):
    program_api._channel, program_api._image_size = InProcess(), (float(size[0]), float(size[1]))
    scope = {name: getattr(program_api, name) for name in program_api.API_NAMES}
    exec(compile(source, "<program>", "exec"), scope)
    return scope["execute_command"](program_api.ImagePatch(0, 0, *size))


def main() -> None:
    image = Image.new("RGB", (640, 480))
    run_program(PROGRAMS["geometry"], image)  # warm-up (page cache for the child interpreter)
    table = Table(title=f"visual-program sandbox vs in-process exec (median of {REPEATS})")
    for column in ("program", "sandbox ms", "over empty ms", "in-process ms", "ratio"):
        table.add_column(column, justify="right" if column != "program" else "left")
    empty = None
    for name, source in PROGRAMS.items():
        sandboxed = [timed(lambda s=source: execute(s, image.size, handler, Limits()))[0] for _ in range(REPEATS)]
        direct = [timed(lambda s=source: in_process(s, image.size))[0] for _ in range(REPEATS)]
        outcome = execute(source, image.size, handler, Limits())
        assert outcome.ok and outcome.value == in_process(source, image.size), outcome.error
        wall, base = statistics.median(sandboxed), statistics.median(direct)
        empty = wall if empty is None else empty
        over = f"{(wall - empty) * 1000:.1f}"
        table.add_row(name, f"{wall * 1000:.1f}", over, f"{base * 1000:.2f}", f"{wall / base:.0f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
