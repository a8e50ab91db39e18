"""Probe (kept in git history only): does Patch Matters' yes-likelihood tell its true patch sentences from the
hallucinated ones? AUC per way of asking, on world:caption scenes of seed 7 (not the eval seed).

    python bench/claim_auc.py 12     # scenes; demo model

Runs patch-matters, takes every scored doubtful sentence naming an object (the trace's group_samples steps), labels
it hallucinated when one of its mentions matches no scene object (`foveate.eval.captions`), and re-scores it on
its crop asking the parsed object with / without its size, with / without the look-first form.
"""

from __future__ import annotations

import math
import sys

from foveate import protocol
from foveate.agents import get_builder
from foveate.api import DEMO_MODEL_DIR, run_strategy
from foveate.eval.captions import parse_mentions
from foveate.eval.runner import resolve_tasks
from foveate.policies.transformers_vlm import TransformersVLM
from foveate.tools.images import load_image
from foveate.tools.store import ImageStore


def scored_sentences(policy, store, rows) -> list[tuple]:
    """(crop, sentence, mentions, hallucinated) of every sentence patch-matters scored."""
    graph = get_builder("patch-matters")()
    found = []
    for row in rows:
        image = load_image(row["image"])
        inputs = {"image": store.put(image), "question": row["question"]}
        result = run_strategy(graph, inputs, strategy="probe", policy=policy, store=store, max_new_tokens=160)
        for step in result.trace.steps:
            if step.get("node") != "aggregate":
                continue
            crop = image.crop(tuple(int(v) for v in step["arguments"]["box"]))
            for group in step["arguments"]["groups"]:
                if group["kind"] == "similar":
                    continue
                for sentence, score in zip(group["sentences"], group["scores"], strict=True):
                    mentions = parse_mentions(sentence)
                    if mentions and score != 0.0:  # 0.0: never scored (the merge could not add it)
                        wrong = any(not any(m.consistent(o) for o in row["objects"]) for m in mentions)
                        found.append((crop, sentence, mentions, wrong))
    return found


def p_yes(policy, crops_and_claims, look_first: bool) -> list[float]:
    conversations, choices = [], []
    for crop, claim in crops_and_claims:
        text = f"Is there {claim} in the image?"
        conversations.append(
            [{"role": "user", "content": [{"type": "image", "image": crop}, {"type": "text", "text": text}]}]
        )
        choices.append([protocol.look_answer([claim], w) for w in ("yes", "no")] if look_first else ["yes", "no"])
    logprobs = []
    for start in range(0, len(conversations), 32):
        logprobs += policy.choice_logprobs(conversations[start : start + 32], choices[start : start + 32])
    return [1 / (1 + math.exp(min(700, no - yes))) for yes, no in logprobs]


def mention_text(mention, size: bool) -> str:
    words = [w for w in (mention.size if size else None, mention.color, mention.shape) if w]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def auc(scores: list[float], wrong: list[bool]) -> float:
    """P(a true sentence scores above a hallucinated one), ties counting half."""
    true = [s for s, w in zip(scores, wrong, strict=True) if not w]
    false = [s for s, w in zip(scores, wrong, strict=True) if w]
    if not true or not false:
        return float("nan")
    return sum((t > f) + 0.5 * (t == f) for t in true for f in false) / (len(true) * len(false))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    policy, store = TransformersVLM(DEMO_MODEL_DIR), ImageStore()
    items = scored_sentences(policy, store, resolve_tasks("world:caption", n=n, seed=7).rows)
    wrong = [item[3] for item in items]
    print(f"{len(items)} scored sentences, {sum(wrong)} hallucinated")
    sentences = [(crop, sentence[:1].lower() + sentence[1:]) for crop, sentence, *_ in items]
    print("the whole sentence, look-first:", round(auc(p_yes(policy, sentences, True), wrong), 3))
    for size in (True, False):
        for look_first in (True, False):
            asked = [(k, crop, mention_text(m, size)) for k, (crop, _, ms, _) in enumerate(items) for m in ms]
            scores = p_yes(policy, [(crop, claim) for _, crop, claim in asked], look_first)
            per_sentence = [1.0] * len(items)  # a sentence is as likely as its least likely object
            for (k, _, _), score in zip(asked, scores, strict=True):
                per_sentence[k] = min(per_sentence[k], score)
            print(f"its objects, size={size}, look-first={look_first}:", round(auc(per_sentence, wrong), 3))


if __name__ == "__main__":
    main()
