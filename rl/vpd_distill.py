"""VPD's data stage: programs → executions → verification against labels → rationales → TRL SFT rows.

    foveate vpd distill --task world:large --n 200 --out sft.jsonl [--k 5] [--wisdom-endpoint URL --wisdom-model M]

Paper: "Visual Program Distillation" (CVPR 2024; RESEARCH.md §6). Per labelled (image, question):

1. **Programs**: the programmer LLM (the wisdom policy, else the VLM) samples ``k`` programs against the ViperGPT
   API (`tools.program_api.API_DOC`); all items' prompts go out in ONE batched ``chat`` call with ``n = k``. With
   ``--world-programs`` the program is instead the one the world's question template implies (`rl.vpd_world`).
2. **Executions**: programs run in the sandbox (`tools.program.run_program`, the VLM answering ``simple_query`` and
   the others, attention grounding for ``find`` on a white-box VLM), in order, every call logged.
3. **Verification**: the first program whose answer scores 1 against the item's labels (`eval.metrics.score_answer`,
   the evaluator's own rule) is kept; items with none are dropped (counted).
4. **Rationale**: the LLM rewrites question + program + execution log into a short rationale that keeps the
   grounding ("find('square') found 2 at [40, 40, 120, 110], …") and ends with the answer — one batched call over
   the kept items. A rewrite whose last sentence does not state the answer is replaced by `template_rationale`,
   which states the logged calls and their boxes itself (counted as ``template_rationales``).
5. **Rows**: two TRL conversational prompt-completion rows per kept item, ``{"images": [path], "prompt": [user],
   "completion": [assistant]}`` with an ``{"type": "image"}`` placeholder (TRL trains on the completion only):
   ``question + ANSWER_SUFFIX → answer`` and ``question + RATIONALE_SUFFIX → rationale`` (``task`` says which).
   TRL's ``DataCollatorForVisionLanguageModeling`` reads them once the image paths are loaded (``datasets.Image``);
   ``foveate train sft --data FILE`` trains on them with TRL's ``SFTTrainer`` (`rl.trl_sft`).

Deviations: the paper's tools are PaLI-X-era models; here the project's VLM, its attention and PP-OCRv4. The
paper uses PaLM-2 for the rewrite; any wisdom LLM here, with the template as a checked fallback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from foveate.errors import FoveateError
from foveate.eval.metrics import normalize_answer, score_answer
from foveate.policies.base import ChatPolicy, SamplingParams
from foveate.protocol import strip_thought
from foveate.tools.grounding import Grounder
from foveate.tools.images import load_image
from foveate.tools.program import ProgramResult, run_program, value_to_answer
from foveate.tools.program_api import API_DOC

ANSWER_SUFFIX = " Answer with a single word or phrase."
RATIONALE_SUFFIX = " Explain the rationale to answer the question."
PROGRAM_PROMPT = "{api}\n\nQuestion: {question}\nWrite execute_command for this question. Reply with only the code."
REWRITE_PROMPT = """Question: {question}
A program answered it:
{program}
What the program did, call by call (boxes are [left, upper, right, lower] pixels):
{log}
Its answer: {answer}
Rewrite this as a short rationale in plain words that keeps what was found and where, and end with
"So the answer is {answer}." Reply with only the rationale."""


@dataclass
class DistillStats:
    """What happened to the items: kept, dropped (no program verified), programs run and verified, rewrites."""

    items: int = 0
    kept: int = 0
    dropped: int = 0
    programs_run: int = 0
    programs_ok: int = 0
    llm_rationales: int = 0
    template_rationales: int = 0


def _box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def log_lines(log: Sequence[dict[str, Any]]) -> list[str]:
    """One line per logged call: name, arguments, result or error, and the boxes it found."""
    lines = []
    for entry in log:
        args = ", ".join(json.dumps(value) for value in entry.get("args", {}).values())
        outcome = f"error {entry['error']}" if entry.get("error") else json.dumps(entry.get("result"))
        found = entry.get("boxes", [])[1:]
        where = f" at {', '.join(_box(b) for b in found)}" if found else ""
        lines.append(f"{entry.get('name')}({args}) -> {outcome}{where}")
    return lines


def template_rationale(log: Sequence[dict[str, Any]], answer: str) -> str:
    """A rationale stated from the execution log alone: what each model-backed call found, where, then the answer.

    >>> template_rationale([{"name": "find", "args": {"name": "square"}, "result": [[1, 2, 3, 4]],
    ...                      "boxes": [[0, 0, 9, 9], [1, 2, 3, 4]]}], "1")
    'Looking for square, I found 1 at [1, 2, 3, 4]. So the answer is 1.'
    """
    sentences = []
    for entry in log:
        name, args, result = entry.get("name"), entry.get("args", {}), entry.get("result")
        region = _box(entry["boxes"][0]) if entry.get("boxes") else "the image"
        if entry.get("error"):
            continue
        if name == "find":
            where = ", ".join(_box(b) for b in result or [])
            sentences.append(
                f"Looking for {args.get('name')}, I found {len(result or [])}" + (f" at {where}" if where else "")
            )
        elif name == "simple_query":
            sentences.append(f"Asked {args.get('question')!r} about {region}, the answer is {result!r}")
        elif name == "verify_property":
            sentences.append(f"The {args.get('name')} in {region} is {'' if result else 'not '}{args.get('property')}")
        elif name == "best_text_match":
            sentences.append(f"Of {', '.join(args.get('options', []))}, {region} matches {result!r} best")
        elif name == "ocr":
            sentences.append(f"The text in {region} reads {result!r}")
        elif name == "llm_query":
            sentences.append(f"Asked {args.get('question')!r}, the answer is {result!r}")
    return ". ".join([*sentences, f"So the answer is {answer}."]) if sentences else f"So the answer is {answer}."


def ends_with_answer(text: str, answer: str) -> bool:
    """Whether the last sentence of ``text`` states ``answer`` (as whole words, after normalisation).

    >>> ends_with_answer("There is no bus. So the answer is yes.", "no"), ends_with_answer("So it is 3.", "3")
    (False, True)
    """
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    if not sentences:
        return False
    words, wanted = normalize_answer(sentences[-1]).split(), normalize_answer(answer).split()
    return bool(wanted) and any(words[i : i + len(wanted)] == wanted for i in range(len(words)))


def sft_rows(row: dict[str, Any], answer: str, rationale: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The two TRL conversational prompt-completion rows of one verified item (short answer, rationale)."""

    def chat(suffix: str, target: str, task: str) -> dict[str, Any]:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"] + suffix}]}
        reply = {"role": "assistant", "content": [{"type": "text", "text": target}]}
        return {"images": [str(row["image"])], "prompt": [user], "completion": [reply], "task": task, "id": row["id"],
                **extra}  # fmt: skip

    return [chat(ANSWER_SUFFIX, answer, "answer"), chat(RATIONALE_SUFFIX, rationale, "rationale")]


def sample_programs(
    rows: Sequence[dict[str, Any]], programmer: ChatPolicy | None, params: SamplingParams, world_programs: bool
) -> list[list[str]]:
    """Candidate programs per row: ``params.n`` samples from ``programmer`` in one batched call, or with
    ``world_programs`` the one program `rl.vpd_world.world_program` writes from the question's template."""
    if world_programs:
        from foveate.rl.vpd_world import world_program

        return [[source] if (source := world_program(row["question"])) else [] for row in rows]
    if programmer is None:
        raise FoveateError("distill needs a programmer LLM, or world_programs=True")
    from foveate.agents.vpd import extract_program  # the strategy's own code extraction (rl may use agents)

    prompts = [[{"role": "user", "content": PROGRAM_PROMPT.format(api=API_DOC, question=r["question"])}] for r in rows]
    samples = programmer.chat(prompts, params) if rows else []
    return [[extract_program(completion.text) for completion in sample.completions] for sample in samples]


def rationales(
    verified: Sequence[tuple[dict[str, Any], str, ProgramResult]], rewriter: ChatPolicy | None, tokens: int
) -> tuple[list[str], int]:
    """One rationale per verified item (the rewriter's when its last sentence states the answer, else the
    template's) and how many came from the rewriter. No rewriter: templates only."""
    prompts = [
        [
            {
                "role": "user",
                "content": REWRITE_PROMPT.format(
                    question=row["question"],
                    program=source,
                    log="\n".join(log_lines(result.log)) or "(no calls)",
                    answer=result.answer,
                ),
            }
        ]  # fmt: skip
        for row, source, result in verified
    ]
    replies = rewriter.chat(prompts, SamplingParams(max_new_tokens=tokens)) if verified and rewriter else []
    texts = [strip_thought(reply.text).strip() for reply in replies] or [""] * len(verified)
    out, from_llm = [], 0
    for (_, _, result), text in zip(verified, texts, strict=True):
        if ends_with_answer(text, result.answer):
            out.append(text)
            from_llm += 1
        else:
            out.append(template_rationale(result.log, result.answer))
    return out, from_llm


def distill(
    rows: Sequence[dict[str, Any]],
    programmer: ChatPolicy | None,
    eyesight: ChatPolicy,
    *,
    k: int = 5,
    temperature: float = 0.7,
    seed: int = 0,
    max_program_tokens: int = 384,
    rewrite_tokens: int = 256,
    grounder: Grounder | None = None,
    timeout_s: float = 10.0,
    world_programs: bool = False,
) -> tuple[list[dict[str, Any]], DistillStats]:
    """SFT rows from ``rows`` (task rows with ``image``, ``question``, ``answers``); see the module docstring.
    ``programmer`` also rewrites rationales (None: templates); ``world_programs`` takes the programs from the
    world's question templates instead of sampling them."""
    stats = DistillStats(items=len(rows))
    params = SamplingParams(
        max_new_tokens=max_program_tokens, n=k, temperature=temperature if k > 1 else 0.0, seed=seed
    )
    candidates = sample_programs(rows, programmer, params, world_programs)
    verified: list[tuple[dict[str, Any], str, ProgramResult]] = []
    for row, sources in zip(rows, candidates, strict=True):
        image = load_image(row["image"])
        for source in sources:
            result = run_program(
                source, image, policy=eyesight, wisdom=programmer, grounder=grounder, timeout_s=timeout_s
            )
            stats.programs_run += 1
            if result.ok and result.answer and score_answer(result.answer, row, image.size)["score"] == 1.0:
                stats.programs_ok += 1
                verified.append((row, source, result))
                break
    stats.kept, stats.dropped = len(verified), len(rows) - len(verified)
    texts, stats.llm_rationales = rationales(verified, programmer, rewrite_tokens)
    stats.template_rationales = len(verified) - stats.llm_rationales
    out: list[dict[str, Any]] = []
    for (row, source, result), rationale in zip(verified, texts, strict=True):
        # The log's results vary in type (lists, text, booleans): kept as JSON text so Arrow can type the column.
        extra = {"program": source, "execution": json.dumps(result.log), "value": value_to_answer(result.value)}
        out.extend(sft_rows(row, result.answer, rationale, extra))
    return out, stats


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """JSON lines, one SFT row each (images as paths)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def stats_dict(stats: DistillStats) -> dict[str, int]:
    return asdict(stats)
