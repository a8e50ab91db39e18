"""Visual programs: run a generated ``execute_command(image_patch)`` against the image, sandboxed.

    >>> from foveate.tools.program import run_program
    >>> source = "def execute_command(image_patch):\\n    return image_patch.width > image_patch.height"
    >>> result = run_program(source, Image.new("RGB", (64, 32)))
    >>> result.ok, result.value, result.answer
    (True, True, 'yes')

The API is ViperGPT's (`tools.program_api.API_DOC`, RESEARCH.md §6): ``find``, ``exists``, ``count``,
``verify_property``, ``simple_query``, ``best_text_match``, ``ocr``, ``crop``, ``overlaps_with``, the geometry
attributes, and ``distance``, ``bool_to_yesno``, ``coerce_to_numeric``, ``llm_query``. The program runs in a
sandbox (`tools.sandbox`: static check, then a resource-limited child interpreter that holds no pixels); every
call that needs the image or a model comes back here and is answered by `ProgramTools`:

- ``find(name)``: the ``grounder`` (the `tools.grounding.Grounder` protocol) on the patch's crop, boxes mapped
  back to original pixels. Default: `AttentionGrounder` over ``policy`` when it is white-box; otherwise there is
  no grounder and ``find`` fails with a clear error. ``exists``/``count`` are ``len(find(name))``.
- ``verify_property(name, prop)``: the VLM on the crop, "Is there a {prop} {name} in the image?" (yes/no; the
  world's existence question, where ViperGPT uses CLIP).
- ``simple_query(q)``: the VLM on the crop, greedy, short.
- ``best_text_match(options)``: the VLM on the crop asked to pick one; its reply is matched to an option (exact,
  then contained, then most shared words; ViperGPT scores options with CLIP).
- ``ocr()``: PP-OCRv4 detection + recognition (`rapidocr-onnxruntime`, runs offline) on the crop, lines sorted
  top to bottom, left to right.
- ``llm_query(q)``: the ``wisdom`` policy (text only), else ``policy``.

Programs that use only geometry run with ``policy=None``; a model-backed call without a model fails with a
one-line error naming what is missing. Every call is in ``result.log`` (name, args, result, boxes).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from foveate.errors import BoxError
from foveate.policies.base import ChatPolicy, SamplingParams, WhiteBoxPolicy
from foveate.protocol import strip_thought
from foveate.tools.boxes import Box
from foveate.tools.crop import crop as crop_image
from foveate.tools.grounding import AttentionGrounder, Grounder
from foveate.tools.images import load_image
from foveate.tools.program_api import ProgramCallError
from foveate.tools.sandbox import Execution, Limits, ProgramRefused, check_program, execute

__all__ = ["ProgramRefused", "ProgramResult", "ProgramTools", "check_program", "run_program", "value_to_answer"]

VERIFY_PROMPT = "Is there a {property} {name} in the image? Answer yes or no."
CHOOSE_PROMPT = "Which of these describes the image best: {options}? Answer with one of them."
_WORD = re.compile(r"[a-z0-9]+")
_ocr_engine: Any = None
_ocr_lock = threading.Lock()


def value_to_answer(value: Any) -> str:
    """A program's value as an answer: booleans → yes/no, whole floats → integers, patches → their box."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict) and set(value) == {"box"}:
        return "[" + ", ".join(f"{v:g}" for v in value["box"]) + "]"
    if isinstance(value, list):
        return ", ".join(value_to_answer(item) for item in value)
    return "" if value is None else str(value).strip()


@dataclass
class ProgramResult(Execution):
    """The outcome of one program (the sandbox's `Execution`: ``ok`` with ``value``, or ``error`` in one line; the
    call ``log``, print output, executed lines, model-backed calls and wall time), with its value as an answer."""

    @property
    def answer(self) -> str:
        return value_to_answer(self.value) if self.ok else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "value": self.value,
            "answer": self.answer,
            "error": self.error,
            "log": self.log,
            "stdout": self.stdout,
            "steps": self.steps,
            "calls": self.calls,
            "elapsed_s": round(self.elapsed_s, 4),
        }


def match_option(reply: str, options: list[str]) -> str:
    """The option a free-text reply names: exact, then contained in the reply, then most shared words."""
    text = reply.strip().lower().rstrip(".")
    for option in options:
        if option.lower() == text:
            return option
    contained = [option for option in options if option.lower() in text]
    if contained:
        return max(contained, key=len)
    words = set(_WORD.findall(text))
    return max(options, key=lambda option: len(words & set(_WORD.findall(option.lower()))))


def _ocr_lines(image: Image.Image) -> list[tuple[list[float], str, float]]:
    """(box in ``image`` pixels, text, confidence) per detected line, top to bottom, left to right."""
    global _ocr_engine
    import numpy as np

    with _ocr_lock:
        if _ocr_engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as error:
                raise ProgramCallError("ocr needs the rapidocr-onnxruntime package") from error
            _ocr_engine = RapidOCR()
        found, _ = _ocr_engine(np.asarray(image.convert("RGB")))
    lines = []
    for points, text, score in found or []:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lines.append(([min(xs), min(ys), max(xs), max(ys)], str(text), float(score)))
    return sorted(lines, key=lambda line: (round(line[0][1] / 10), line[0][0]))


class ProgramTools:
    """The parent's answers to a program's model-backed calls (see the module docstring)."""

    def __init__(
        self,
        image: Image.Image,
        policy: ChatPolicy | None = None,
        *,
        wisdom: ChatPolicy | None = None,
        grounder: Grounder | None = None,
        max_new_tokens: int = 32,
    ) -> None:
        self.image, self.policy, self.wisdom, self.max_new_tokens = image, policy, wisdom, max_new_tokens
        if grounder is None and isinstance(policy, WhiteBoxPolicy):
            grounder = AttentionGrounder(policy, verify=True)
        self.grounder = grounder

    def __call__(self, method: str, box: list[float] | None, args: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        handler = getattr(self, f"call_{method}", None) if method.isidentifier() else None
        if handler is None:
            raise ProgramCallError(f"unknown call {method!r}")
        started = time.monotonic()
        result, boxes, extra = handler(self._region(box) if box is not None else None, **args)
        entry = {"name": method, "args": args, "result": result, "boxes": boxes, **extra}
        return result, {**entry, "latency_s": round(time.monotonic() - started, 4)}

    def _region(self, box: list[float]) -> tuple[Image.Image, Box]:
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise ProgramCallError(f"malformed patch box {box!r}")
        return crop_image(self.image, Box(*box).clamp(*self.image.size), min_side=1)

    def _model(self, method: str) -> ChatPolicy:
        if self.policy is None:
            raise ProgramCallError(f"{method} needs a vision-language model, and run_program was given no policy")
        return self.policy

    def _ask(self, method: str, region: Image.Image, text: str) -> tuple[str, str]:
        """(the answer without any leading thought, the raw reply) of the VLM on ``region``."""
        parts = [{"type": "image", "image": region}, {"type": "text", "text": text}]
        conversation = [{"role": "user", "content": parts}]
        reply = self._model(method).chat_one(conversation, SamplingParams(max_new_tokens=self.max_new_tokens)).text
        return strip_thought(reply), reply

    # ---- calls (each returns result, boxes for the log, extra log fields) -----------------------------------
    def call_find(self, patch: tuple[Image.Image, Box], name: str) -> tuple[Any, list, dict]:
        if self.grounder is None:
            raise ProgramCallError("find needs a grounder: pass grounder= or a white-box policy (attention grounding)")
        region, used = patch
        (found,) = self.grounder.ground(region, [name])
        boxes, scores = [], []
        for grounding in found:
            shifted = Box(grounding.box.x1 + used.x1, grounding.box.y1 + used.y1, grounding.box.x2 + used.x1,
                          grounding.box.y2 + used.y1)  # fmt: skip
            try:
                boxes.append(shifted.clamp(*self.image.size).to_list())
                scores.append(round(float(grounding.score), 4))
            except BoxError:
                continue
        return boxes, [used.to_list(), *boxes], {"scores": scores}

    def call_verify_property(self, patch: tuple[Image.Image, Box], name: str, property: str) -> tuple[Any, list, dict]:
        answer, reply = self._ask("verify_property", patch[0], VERIFY_PROMPT.format(property=property, name=name))
        return answer.lower().startswith("yes"), [patch[1].to_list()], {"reply": reply}

    def call_simple_query(self, patch: tuple[Image.Image, Box], question: str) -> tuple[Any, list, dict]:
        answer, reply = self._ask("simple_query", patch[0], question)
        return answer, [patch[1].to_list()], {"reply": reply}

    def call_best_text_match(self, patch: tuple[Image.Image, Box], options: list[str]) -> tuple[Any, list, dict]:
        if not options or not all(isinstance(option, str) for option in options):
            raise ProgramCallError("best_text_match needs a list of strings")
        answer, reply = self._ask("best_text_match", patch[0], CHOOSE_PROMPT.format(options=", ".join(options)))
        return match_option(answer, options), [patch[1].to_list()], {"reply": reply}

    def call_ocr(self, patch: tuple[Image.Image, Box]) -> tuple[Any, list, dict]:
        region, used = patch
        lines = _ocr_lines(region)
        boxes = [[b[0] + used.x1, b[1] + used.y1, b[2] + used.x1, b[3] + used.y1] for b, _, _ in lines]
        text = " ".join(text for _, text, _ in lines)
        return text, [used.to_list(), *boxes], {"confidences": [round(score, 4) for _, _, score in lines]}

    def call_llm_query(self, patch: None, question: str) -> tuple[Any, list, dict]:
        model = self.wisdom or self.policy
        if model is None:
            raise ProgramCallError("llm_query needs a language model, and run_program was given no policy or wisdom")
        params = SamplingParams(max_new_tokens=max(self.max_new_tokens, 64))
        reply = model.chat_one([{"role": "user", "content": question}], params).text
        return strip_thought(reply), [], {"reply": reply}


def run_program(
    source: str,
    image: Any,
    *,
    policy: ChatPolicy | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 256,
    grounder: Grounder | None = None,
    wisdom: ChatPolicy | None = None,
    max_steps: int = 100_000,
    max_calls: int = 32,
    max_new_tokens: int = 32,
) -> ProgramResult:
    """Run ``source``'s ``execute_command(image_patch)`` on ``image`` (path, bytes, data URL or PIL) in the
    sandbox; never raises for anything the program does (refusals, errors and limits come back as ``.error``)."""
    loaded = load_image(image)
    tools = ProgramTools(loaded, policy, wisdom=wisdom, grounder=grounder, max_new_tokens=max_new_tokens)
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_steps=max_steps, max_calls=max_calls)
    outcome = execute(source, loaded.size, tools, limits)
    return ProgramResult(**vars(outcome))
