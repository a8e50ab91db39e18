"""How well a model answers the agents' role and program prompts: the formats of `rl.sft_roles`, held out.

    python bench/role_formats.py [--n 24] [--preset large] [--seed 1000] [--model DIR] [--max-new-tokens 128]

For ``n`` held-out world items (eval seed 1000), every turn of the item's world ProReason trace and its program
prompt is asked of the model (greedy, one batched call per role). Per role the table gives how many replies are
valid (the agent's own parser: `parse_reply` with the role's schema; for programs `extract_program` and the
sandbox's static check; for the vision expert any non-empty text) and how many are right (the decision or answer
the world trace holds: the expert and sub-questions, the verdict, the answer; a vision reply is right when it
contains the fact's key word; a program when it is the world's program). Run it on the demo model before and after a
stage that trains these formats. Prints only.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from foveate.agents.proreason_roles import Dispatch, Reasoned, Summary, Verdict, parse_reply
from foveate.agents.vpd import extract_program
from foveate.api import make_policy
from foveate.policies.base import SamplingParams
from foveate.protocol import strip_thought
from foveate.rl.sft_roles import program, role_trace
from foveate.tools.sandbox import ProgramRefused, check_program
from foveate.world import iter_items

SCHEMAS = {"dispatch": Dispatch, "reasoning": Reasoned, "referee": Verdict, "summarize": Summary}
DECISIVE = {"dispatch": ("expert", "sub_questions"), "referee": ("verdict",), "reasoning": ("answer",),
            "summarize": ("answer",)}  # fmt: skip


def judge(role: str, reply: str, target: str) -> tuple[bool, bool]:
    """(valid, right) of one reply against the trace's target."""
    if role == "vision":
        text = (strip_thought(reply) or reply.strip()).lower()
        if target.startswith("Its centre"):  # a position: both coordinates within 100 of 1000
            wanted, got = re.findall(r"\d+", target)[:2], re.findall(r"\d+", text)[:2]
            close = len(got) == 2 and all(abs(int(a) - int(b)) <= 100 for a, b in zip(wanted, got, strict=True))
            return bool(text), close
        words = target.lower().rstrip(".").replace('"', "").split()
        key = words[0].rstrip(",") if words[0] in ("yes,", "no,") else words[-1]  # yes / no, or the fact's last word
        return bool(text), key in text
    if role == "program":
        source = extract_program(reply)
        try:
            check_program(source)
        except (ProgramRefused, SyntaxError):
            return False, False
        return True, source.strip() == target.strip()
    try:
        value = parse_reply(reply, SCHEMAS[role])
    except ValueError:
        return False, False
    wanted = parse_reply(target, SCHEMAS[role])
    return True, all(getattr(value, field) == getattr(wanted, field) for field in DECISIVE[role])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--preset", default="large")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("FOVEATE_HOME", tempfile.mkdtemp(prefix="foveate-bench-"))
    policy = make_policy(args.model)
    turns: dict[str, list[tuple[list, str]]] = defaultdict(list)
    for image, scene, row in iter_items(args.n, seed=args.seed, preset=args.preset):
        for turn in role_trace(image, row, scene) or []:
            turns[turn["role"]].append((turn["messages"][:1], turn["messages"][1]["content"]))
        if example := program(row=row):
            turns["program"].append((example["messages"][:1], example["messages"][1]["content"]))
    table = Table(title=f"role and program prompts on {args.n} {args.preset} items (seed {args.seed}), {policy.name}")
    for column in ("role", "n", "valid %", "right %"):
        table.add_column(column, justify="left" if column == "role" else "right")
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    for role in ("dispatch", "vision", "referee", "reasoning", "summarize", "program"):
        asked = turns.get(role, [])
        if not asked:
            continue
        replies = policy.chat([conversation for conversation, _ in asked], params)
        judged = [judge(role, r.text, target) for r, (_, target) in zip(replies, asked, strict=True)]
        valid, right = sum(v for v, _ in judged), sum(r for _, r in judged)
        table.add_row(role, str(len(asked)), f"{100 * valid / len(asked):.1f}", f"{100 * right / len(asked):.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
