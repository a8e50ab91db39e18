"""DeepEyes' reward, as plain functions: ``R = 0.8·acc + 0.2·fmt + 1.2·tool`` (RESEARCH.md §2).

- ``acc``: the task's own exact answer rules (`foveate.eval.metrics.score_answer`: normalised exact match,
  yes/no parsing, IoU ≥ 0.5 for grounding rows) on the ``<answer>`` of the LAST assistant turn; 0 without one.
  DeepEyes used an LLM judge (0/1); for exact-answer data the rule match is the honest equivalent.
- ``fmt``: −1 on a format error, else 0. A format error is: unbalanced ``<think>``/``<answer>``/``<tool_call>``
  tags in any assistant turn, no ``<answer>…</answer>`` in the last turn, or an answer of 1000 characters or more.
- ``tool``: 1 only if at least one zoom succeeded (a crop came back) AND ``acc > 0.5``; else 0.

TRL's response parser (``trl.chat_template_utils.qwen3_template``) moves ``<think>…</think>`` out of ``content``
into ``reasoning_content`` and a parsed ``<tool_call>`` into ``tool_calls``; `assistant_text` puts both back, so
the tags are checked on what the model actually wrote. The TRL-facing functions (`accuracy_reward`,
`format_reward`, `tool_reward`) have TRL's signature ``f(prompts, completions, completion_ids, **columns)`` and are
combined by ``GRPOConfig.reward_weights = [0.8, 0.2, 1.2]``, so TRL logs each part beside the total.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from foveate.eval.metrics import score_answer

WEIGHTS = {"accuracy": 0.8, "format": 0.2, "tool": 1.2}  # DeepEyes' reward weights
MAX_ANSWER_CHARS = 1000  # an answer this long or longer is a format error
_TAGS = ("think", "answer", "tool_call")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def deepeyes_reward(acc: float, fmt: float, tool: float) -> float:
    """The total reward from its three parts.

    >>> deepeyes_reward(1.0, 0.0, 1.0)   # right, well-formed, zoomed
    2.0
    >>> deepeyes_reward(1.0, 0.0, 0.0)   # right without zooming
    0.8
    >>> deepeyes_reward(0.0, -1.0, 0.0)  # wrong and malformed
    -0.2
    """
    return round(WEIGHTS["accuracy"] * acc + WEIGHTS["format"] * fmt + WEIGHTS["tool"] * tool, 10)


def balanced(text: str) -> bool:
    """Whether every ``<think>``, ``<answer>`` and ``<tool_call>`` tag in ``text`` opens, closes, opens … in order.

    >>> balanced("<think>a</think><answer>b</answer>")
    True
    >>> balanced("<think>a<answer>b</answer>")
    False
    >>> balanced("</answer><answer>")
    False
    """
    for tag in _TAGS:
        events = sorted(
            [(m.start(), 1) for m in re.finditer(f"<{tag}>", text)]
            + [(m.start(), -1) for m in re.finditer(f"</{tag}>", text)]
        )
        depth = 0
        for _, step in events:
            depth += step
            if depth not in (0, 1):
                return False
        if depth != 0:
            return False
    return True


def format_score(turns: Sequence[str]) -> float:
    """−1.0 if the assistant turns ``turns`` (texts, in order) break DeepEyes' format, else 0.0.

    >>> format_score(["<think>zoom</think><tool_call>{}</tool_call>", "<think>ok</think><answer>red</answer>"])
    0.0
    >>> format_score(["<think>ok</think><answer>red"])    # unbalanced
    -1.0
    >>> format_score(["<think>ok</think>red"])            # no answer
    -1.0
    >>> format_score(["<answer>" + "x" * 1000 + "</answer>"])  # too long
    -1.0
    """
    if not turns or not all(balanced(turn) for turn in turns):
        return -1.0
    answer = final_answer(turns)
    if answer is None or len(answer) >= MAX_ANSWER_CHARS:
        return -1.0
    return 0.0


def final_answer(turns: Sequence[str]) -> str | None:
    """The text inside the last turn's first ``<answer>…</answer>`` (stripped), or None.

    >>> final_answer(["<tool_call>{}</tool_call>", "<answer> blue </answer>"])
    'blue'
    >>> final_answer(["<answer>blue</answer>", "<think>no answer here</think>"]) is None
    True
    """
    if not turns:
        return None
    match = _ANSWER.search(turns[-1])
    return match.group(1).strip() if match else None


def accuracy(answer: str | None, row: dict[str, Any], box_convention: str = "thousand") -> float:
    """The task's exact answer rules on ``answer`` (None → 0.0); ``row`` is a task row (answers, family, …).

    >>> accuracy("Red.", {"answers": ["red"], "preset": "default"})
    1.0
    >>> accuracy("yes", {"answers": ["no"]})
    0.0
    >>> accuracy(None, {"answers": ["red"]})
    0.0
    """
    if answer is None:
        return 0.0
    size = row.get("image_size") or (1000, 1000)
    return float(score_answer(answer, row, size, box_convention)["score"])


def tool_score(zooms: int, acc: float) -> float:
    """1.0 if at least one zoom succeeded and the answer is right (``acc > 0.5``), else 0.0.

    >>> tool_score(1, 1.0), tool_score(0, 1.0), tool_score(2, 0.0)
    (1.0, 0.0, 0.0)
    """
    return 1.0 if zooms >= 1 and acc > 0.5 else 0.0


# ---- TRL completions -------------------------------------------------------------------------------------------
def assistant_text(message: dict[str, Any]) -> str:
    """An assistant message of a TRL completion back as written: thought, content, then its tool calls.

    >>> assistant_text({"role": "assistant", "reasoning_content": "look", "content": "<answer>red</answer>"})
    '<think>look</think><answer>red</answer>'
    """
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    thought = message.get("reasoning_content")
    text = (f"<think>{thought}</think>" if thought is not None else "") + content
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        text += f'<tool_call>{{"name": "{function.get("name")}", "arguments": {arguments}}}</tool_call>'
    return text


def assistant_turns(completion: Any) -> list[str]:
    """The assistant turns of one completion (a message list, or plain text = one turn)."""
    if isinstance(completion, str):
        return [completion]
    return [assistant_text(m) for m in completion if m.get("role") == "assistant"]


def returned_crops(completion: Any) -> int:
    """How many tool turns of one completion returned an image (successful zooms)."""
    if isinstance(completion, str):
        return 0
    count = 0
    for message in completion:
        content = message.get("content")
        if message.get("role") == "tool" and isinstance(content, list):
            count += any(isinstance(p, dict) and p.get("type") == "image" for p in content)
    return count


def _rows(n: int, columns: dict[str, Any]) -> list[dict[str, Any]]:
    keys = [k for k in ("answers", "family", "preset", "boxes", "image_size", "scoring", "options") if k in columns]
    return [{k: columns[k][i] for k in keys} for i in range(n)]


def _zooms(completions: list[Any], environments: list[Any] | None) -> list[int]:
    if environments:
        return [int(getattr(env, "zooms", 0)) for env in environments]
    return [returned_crops(c) for c in completions]


def accuracy_reward(
    prompts: list, completions: list, completion_ids: list | None = None, **columns: Any
) -> list[float]:
    """TRL reward: ``acc`` per completion (the task's answer rules on the last turn's ``<answer>``)."""
    convention = columns.get("box_convention_name", "thousand")
    rows = _rows(len(completions), columns)
    return [
        accuracy(final_answer(assistant_turns(c)), row, convention) for c, row in zip(completions, rows, strict=True)
    ]


def format_reward(prompts: list, completions: list, completion_ids: list | None = None, **columns: Any) -> list[float]:
    """TRL reward: ``fmt`` per completion (−1 on a format error, else 0)."""
    return [format_score(assistant_turns(c)) for c in completions]


def tool_reward(prompts: list, completions: list, completion_ids: list | None = None, **columns: Any) -> list[float]:
    """TRL reward: ``tool`` per completion (1 if a zoom succeeded and the answer is right). Also logs the
    tool-use rate (share of rollouts with at least one successful zoom) through TRL's ``log_metric``."""
    zooms = _zooms(completions, columns.get("environments"))
    accs = accuracy_reward(prompts, completions, completion_ids, **columns)
    log_metric = columns.get("log_metric")
    if callable(log_metric) and completions:
        log_metric("tool_use_rate", sum(z >= 1 for z in zooms) / len(zooms))
    return [tool_score(z, a) for z, a in zip(zooms, accs, strict=True)]


REWARD_FUNCS = [accuracy_reward, format_reward, tool_reward]  # in the order of WEIGHTS
