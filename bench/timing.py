"""The timer the benchmark scripts share (imported from the script's own folder: ``from timing import timed``)."""

from __future__ import annotations

import time


def timed(function) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result
