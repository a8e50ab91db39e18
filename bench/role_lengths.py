"""Token lengths of the ProReason role turns and visual programs the demo model trains on (`rl.sft_roles`).

    python bench/role_lengths.py [--n 2000] [--seed 1] [--model DIR]

For ``n`` world rows of the default mix's presets, every role turn of the row's world-derived trace and its program,
rendered as the SFT collator renders them (the demo processor, image tokens expanded): median, p99 and max per role.
The collator cuts examples at 512 tokens. Prints only.
"""

from __future__ import annotations

import argparse
import random

from foveate.rl.sft_data import DataMix, scene_rows
from foveate.rl.sft_roles import program, role_trace, token_count
from foveate.world import iter_scenes, render_scene


def measure(n: int = 2000, seed: int = 1, model: str | None = None) -> dict[str, list[int]]:
    """Token counts (the demo processor, images included) of every role turn and program of ``n`` rows drawn
    from the demo mix's presets, keyed by role ("vision", "dispatch", …, "program")."""
    from foveate.policies.factory import DEMO_MODEL_DIR
    from foveate.policies.loading import load_processor

    processor = load_processor(model or DEMO_MODEL_DIR)
    mix, rng = DataMix(), random.Random(seed)
    streams = {name: iter_scenes(seed, name) for name in mix.presets}
    lengths: dict[str, list[int]] = {}
    rows_seen = 0
    while rows_seen < n:
        preset = rng.choices(list(mix.presets), list(mix.presets.values()))[0]
        scene, rows = next(streams[preset])
        rows = scene_rows(scene, rows, preset, rng, mix)
        image = render_scene(scene)
        for row in rows:
            rows_seen += 1
            examples = [(turn["role"], turn) for turn in role_trace(image, row, scene) or []]
            examples += [("program", example)] if (example := program(row)) else []
            for name, example in examples:
                lengths.setdefault(name, []).append(token_count(processor, example))
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    args = parser.parse_args()
    print("role       examples  median  p99  max")
    for role, counts in sorted(measure(args.n, args.seed, args.model).items()):
        counts.sort()
        median, p99 = counts[len(counts) // 2], counts[int(len(counts) * 0.99)]
        print(f"{role:10s} {len(counts):8d} {median:7d} {p99:4d} {counts[-1]:4d}")


if __name__ == "__main__":
    main()
