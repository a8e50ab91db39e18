"""VPD's program stage: a programmer LLM writes k visual programs, the sandbox runs them, the first that answers wins.

Paper: "Visual Program Distillation: Distilling Tools and Programmatic Reasoning into Vision-Language Models"
(Hu et al., CVPR 2024; RESEARCH.md §6). VPD samples k ≈ 5 programs per (image, question) from an LLM against a
ViperGPT-style API, executes them with vision tools logging every call, and keeps the first program whose output
is correct; that trace is then rewritten into a rationale and distilled into the VLM. At inference time without
labels, this module is the program stage itself:

    intake → write (ONE batched chat call, n = k samples) → execute (programs in order; stop at the first that
    runs ok with a non-empty answer) ─┬─ answered → END
                                      └─ none ran → direct (one VLM answer on the image, marked as fallback) → END

- Programmer: the wisdom policy (``--wisdom-model``/``--wisdom-endpoint`` or the config's), else the VLM itself,
  prompted with `tools.program_api.API_DOC` (left out with ``api_doc=False``, for a programmer trained on the API
  such as the demo model after `rl.sft_roles`' ``program`` format) and the question; code is taken from the first
  fenced block, or from ``def execute_command`` on.
- Execution: `tools.program.run_program` (static check + resource-limited child interpreter, model calls served
  here): ``simple_query``/``verify_property``/``best_text_match`` by the VLM on the patch's crop, ``llm_query`` by
  the wisdom policy, ``ocr`` by PP-OCRv4 (rapidocr), ``find`` by the VLM's own attention when it is white-box
  (`tools.grounding.AttentionGrounder`; on a black-box VLM ``find`` fails with a clear error, and a program that
  needs it fails over to the next).
- Trace: the programmer's call, then one ``program`` step per sampled program (source, ok/value/error, the call log
  with boxes, print output; programs after the winner are listed as not run), then the answer.

Deviations from the paper: no labels at inference, so "correct" becomes "runs ok with a non-empty answer" (the
label check belongs to distillation); ViperGPT's GLIP/CLIP/BLIP tools are replaced by the project's VLM, its
attention and OCR; the fallback when no program runs is a direct VLM answer (ViperGPT raises); programs run
sequentially (each may depend on the model's answers, and the first success ends the stage early).
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate.agents.oracle_crop import model_input_side
from foveate.agents.state import (
    AgentState,
    FoveateContext,
    answer_update,
    image_refs,
    intake,
    prompt_for_trace,
    resolve_context,
    to_policy_messages,
    wisdom_policy,
)
from foveate.errors import FoveateError
from foveate.policies.base import ChatPolicy, WhiteBoxPolicy
from foveate.policies.look_first import trained_formats
from foveate.tools.grounding import AttentionGrounder
from foveate.tools.program import run_program
from foveate.tools.program_api import API_DOC
from foveate.trace import answer_step, model_call_step, program_step

PROGRAM_PROMPT = "{api}\n\nQuestion: {question}\nWrite execute_command for this question. Reply with only the code."
# Without the API reference: for a programmer that was trained on the API (`build(api_doc=False)`).
PROGRAM_PROMPT_TRAINED = (
    "Question: {question}\nWrite execute_command(image_patch) for this question. Reply with only the code."
)
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


class VPDState(AgentState, total=False):
    programs: list[str]  # the sampled programs' sources, in sampling order
    winner: int  # index of the program whose value is the answer (-1: none ran)


def program_messages(question: str, api_doc: bool = True) -> list[dict[str, Any]]:
    """The programmer's conversation (text only): the API reference (unless ``api_doc`` is off), the question, and
    the request for code."""
    if not api_doc:
        return [{"role": "user", "content": PROGRAM_PROMPT_TRAINED.format(question=question)}]
    return [{"role": "user", "content": PROGRAM_PROMPT.format(api=API_DOC, question=question)}]


def sends_api_doc(programmer: ChatPolicy, api_doc: bool | str) -> bool:
    """Whether the programmer's prompt carries the API reference (`build`'s ``api_doc``)."""
    if isinstance(api_doc, bool):
        return api_doc
    trained = isinstance(programmer, WhiteBoxPolicy) and "program" in trained_formats(programmer.model_dir)
    return not trained


def extract_program(text: str) -> str:
    """The code of a programmer's reply: the first fenced block, else from ``def execute_command`` on, else all.

    >>> extract_program("Here:\\n```python\\ndef execute_command(p):\\n    return 1\\n```\\nDone.")
    'def execute_command(p):\\n    return 1\\n'
    """
    match = _FENCE.search(text)
    if match:
        return match.group(1)
    start = text.find("def execute_command")
    return text[start:] if start >= 0 else text


def build(
    checkpointer: Any = None,
    *,
    k: int = 5,
    temperature: float = 0.7,
    seed: int = 0,
    max_program_tokens: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 256,
    api_doc: bool | str = "auto",
):
    """The compiled VPD graph. ``k`` programs sampled at ``temperature`` (greedy when k = 1) with ``seed``, each
    up to ``max_program_tokens`` (None: the run's ``max_new_tokens``); each runs within ``timeout_s`` seconds
    and ``memory_mb`` MiB. ``api_doc=False`` leaves the API reference (~1300 tokens under the demo tokenizer) out
    of the programmer's prompt, for a programmer trained on the API (the demo model: `rl.sft_roles`); ``"auto"``
    leaves it out exactly when the programmer is a white-box model whose saved recipe trained the ``program``
    format (`policies.look_first.trained_formats`), and sends it to every other model."""
    if k < 1 or (max_program_tokens is not None and max_program_tokens < 1) or timeout_s <= 0 or memory_mb < 32:
        raise FoveateError("vpd needs k >= 1, max_program_tokens >= 1, timeout_s > 0 and memory_mb >= 32")
    if not isinstance(api_doc, bool) and api_doc != "auto":
        raise FoveateError(f"vpd's api_doc is true, false or auto, not {api_doc!r}")

    def intake_node(state: VPDState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        return intake(state, resolve_context(runtime).store)

    def write_node(state: VPDState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        """One batched call: the programmer samples k programs for the question."""
        context = resolve_context(runtime)
        programmer = wisdom_policy(context)
        prompt = program_messages(state["question"], sends_api_doc(programmer, api_doc))
        params = context.sampling(
            max_new_tokens=max_program_tokens or context.max_new_tokens,
            n=k,
            temperature=temperature if k > 1 else 0.0,
            seed=seed,
        )
        result = programmer.chat_one(prompt, params)
        programs = [extract_program(completion.text) for completion in result.completions]
        return {"programs": programs, "steps": [model_call_step("write", prompt, result, role="programmer")]}

    def execute_node(state: VPDState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        """Run the programs in order until one runs ok with a non-empty answer."""
        context = resolve_context(runtime)
        image = context.store.get(state["image"])
        grounder = None
        if context.policy.white_box:
            grounder = AttentionGrounder(
                context.policy, box="window", input_side=model_input_side(context.policy), verify=True
            )
        steps, winner, answer = [], -1, ""
        for index, source in enumerate(state["programs"]):
            if winner >= 0:
                steps.append(program_step("execute", state["image"], source, None, index))
                continue
            result = run_program(
                source,
                image,
                policy=context.policy,
                wisdom=wisdom_policy(context),
                grounder=grounder,
                timeout_s=timeout_s,
                memory_mb=memory_mb,
            )
            outcome = result.to_dict()
            if result.ok and not result.answer:
                outcome["error"] = "the program returned an empty answer"
            steps.append(program_step("execute", state["image"], source, outcome, index))
            if result.ok and result.answer:
                winner, answer = index, result.answer
        update: dict[str, Any] = {"winner": winner, "steps": steps}
        if winner >= 0:
            update.update(answer=answer, messages=[AIMessage(content=answer)])
            steps.append(answer_step("execute", answer))
        return update

    def direct_node(state: VPDState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        """Fallback: no program ran, so the VLM answers the conversation directly."""
        context = resolve_context(runtime)
        messages = to_policy_messages(state["messages"], context.store)
        result = context.policy.chat_one(messages, context.sampling())
        reason = f"none of the {len(state.get('programs', []))} programs ran to an answer; answered directly"
        prompt = prompt_for_trace(messages, image_refs(state["messages"]))
        return answer_update("direct", prompt, result, fallback=reason)

    builder = StateGraph(VPDState, context_schema=FoveateContext)
    builder.add_node("intake", intake_node)
    builder.add_node("write", write_node)
    builder.add_node("execute", execute_node)
    builder.add_node("direct", direct_node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input
    builder.add_edge("intake", "write")  # the programmer writes k programs in one batched call
    builder.add_edge("write", "execute")  # the sandbox runs them until one answers
    builder.add_conditional_edges(  # a program answered → done; none did → the VLM answers directly
        "execute", lambda state: END if state.get("winner", -1) >= 0 else "direct", [END, "direct"]
    )
    builder.add_edge("direct", END)
    return builder.compile(checkpointer=checkpointer, name="vpd")


graph = build()
