"""How often Patch Matters' patch sentences are true, by grouping kind and by image-text score (world:caption).

    python bench/patch_sentences.py              # demo model, 4 scenes
    python bench/patch_sentences.py --model DIR --n 10

Runs ``patch-matters`` (default options) on held-out ``world:caption`` scenes and reads its trace: every grouped
sentence that names an object (`foveate.eval.captions.parse_mentions`) is *true in crop* when each of its mentions is
consistent with an object whose box meets the patch. Prints the true rate per kind (similar / contradictory /
unique) and, for scored doubtful sentences (score > 0; sentences the merge could never add are not scored), per
score band: a useful image-text score rises with the true rate. The direct caption's precision on the same scenes is
the bar an added sentence must clear not to raise the hallucination rate.

Measured with the demo model, `python bench/patch_sentences.py --n 4`: similar 53 sentences, 22.6 % true;
contradictory 142, 7.0 %; unique 188, 4.3 %; by score 0-0.5 / 0.5-0.6 / 0.6-0.7 / 0.7-0.8 / 0.8-1: 8.9 / 10.3 / 1.5 /
5.5 / 0.0 % (the demo model's yes-likelihood carries no signal; direct's caption precision is 22.4 %).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from rich.console import Console
from rich.table import Table

BANDS = ((0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 1.01))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VLM directory (default: the demo model)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()

    from foveate.agents import get_builder
    from foveate.api import DEMO_MODEL_DIR, run_strategy
    from foveate.eval.captions import parse_mentions
    from foveate.eval.runner import resolve_tasks
    from foveate.policies.transformers_vlm import TransformersVLM
    from foveate.tools.boxes import Box
    from foveate.tools.images import load_image
    from foveate.tools.store import ImageStore

    policy, store = TransformersVLM(args.model or DEMO_MODEL_DIR), ImageStore()
    graph = get_builder("patch-matters")()
    by_kind: dict[str, list[bool]] = defaultdict(list)
    by_band: dict[tuple[float, float], list[bool]] = defaultdict(list)
    for row in resolve_tasks("world:caption", n=args.n).rows:
        inputs = {"image": store.put(load_image(row["image"])), "question": row["question"]}
        result = run_strategy(
            graph, inputs, strategy="patch-matters", policy=policy, store=store, max_new_tokens=args.max_new_tokens
        )
        for step in result.trace.steps:
            if step.get("name") != "group_samples":
                continue
            patch = Box(*step["arguments"]["box"])
            inside = [o for o in row["objects"] if Box(*o["box"]).intersection(patch)]
            for group in step["arguments"]["groups"]:
                for sentence, score in zip(group["sentences"], group["scores"], strict=True):
                    mentions = parse_mentions(sentence)
                    if not mentions:
                        continue
                    true = all(any(m.consistent(o) for o in inside) for m in mentions)
                    by_kind[group["kind"]].append(true)
                    if group["kind"] != "similar" and score > 0:
                        by_band[next(b for b in BANDS if b[0] <= score < b[1])].append(true)
    table = Table(title=f"patch sentences true of their crop, {args.n} world:caption scenes")
    for header in ("group", "sentences", "true %"):
        table.add_column(header, justify="left" if header == "group" else "right")
    for kind in ("similar", "contradictory", "unique"):
        values = by_kind[kind]
        table.add_row(kind, str(len(values)), f"{100 * sum(values) / len(values):.1f}" if values else "–")
    for band in BANDS:
        values = by_band[band]
        rate = f"{100 * sum(values) / len(values):.1f}" if values else "–"
        table.add_row(f"score {band[0]:.1f}-{min(band[1], 1.0):.1f}", str(len(values)), rate)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
