"""Teacher-forced answers: what a model predicts at each answer token of world examples, in one forward pass.

Used by the training probes (`bench/first_token.py`, `bench/binding.py`): cheaper than generation and free of
decoding choices, so it isolates whether the model reads the image from whether it formats an answer.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import torch

from foveate import protocol
from foveate.policies.look_first import answer_format, looks_first, saved_data_mix  # noqa: F401 (the probes' API)
from foveate.rl.attention_supervision import look_answer_position
from foveate.rl.sft import IGNORE, ChatCollator

# The keys of a collated batch (`ChatCollator`) that the model's forward takes: not labels or loss targets.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def teacher_forced(
    model: Any, collator: ChatCollator, examples: list[dict[str, Any]], chunk_size: int = 20
) -> Iterator[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
    """For each example: (example, predicted ids, true ids) over the assistant's labelled tokens, in order. For a
    look-first answer (``<think>the red star blue</think>blue``) they are the answer's tokens INSIDE the thought,
    predicted from the referent or, for a percept existence thought, after the percept (the lookup); the copy
    after ``</think>`` is left out."""
    tokenizer = collator.processor.tokenizer
    thought_end = tokenizer.convert_tokens_to_ids(protocol.THOUGHT_CLOSE)
    with torch.no_grad():
        for start in range(0, len(examples), chunk_size):
            chunk = examples[start : start + chunk_size]
            batch = collator(chunk)
            logits = model(**batch).logits
            for row, example in enumerate(chunk):
                labels = batch["labels"][row]
                positions = (labels != IGNORE).nonzero()[:, 0]
                _, close, answer = example["messages"][-1]["content"].partition(protocol.THOUGHT_CLOSE)
                if close:
                    size = len(tokenizer(" " + answer, add_special_tokens=False).input_ids)
                    query = look_answer_position(labels, thought_end, size)
                    if query >= 0:  # the answer's tokens inside the thought
                        positions = positions[positions > query][:size]
                yield example, logits[row, positions - 1].argmax(dim=-1), labels[positions]


def question_text(example: dict[str, Any]) -> str:
    """The question of a `qa` example (the user turn's last part; the chat template decides where it renders)."""
    return example["messages"][0]["content"][-1]["text"]


def probe_parser(description: str, n_default: int, n_help: str) -> argparse.ArgumentParser:
    """The arguments the world probes share: model directories, the held-out preset, how many items, the seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("models", nargs="+", help="model directories (tokenizers with one-token answer words)")
    parser.add_argument("--preset", default="simple", help="world preset (simple: 1-4 objects)")
    parser.add_argument("--n", type=int, default=n_default, help=n_help)
    parser.add_argument("--seed", type=int, default=777, help="world stream seed (training streams use 0-6)")
    return parser
