"""The timer the benchmark scripts share (imported from the script's own folder: ``from timing import timed``)."""

from __future__ import annotations

import time


def timed(function) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def aux_step_seconds(model, optimizer, batches: list[dict]) -> list[float]:
    """Wall seconds of each batch's forward + backward + optimiser step, language loss plus the vision aux loss as
    `rl.sft` trains (the model has `rl.vision_aux` attached; the batches carry its targets, popped here). The
    first batch warms up and is not returned."""
    from foveate.rl import vision_aux

    seconds = []
    for batch in batches:
        targets = {key: batch.pop(key) for key in vision_aux.TARGET_KEYS}
        started = time.perf_counter()
        loss = model(**batch).loss + model.foveate_aux.loss(**targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
    return seconds[1:]
