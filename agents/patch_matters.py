"""Patch Matters: divide the image into patches, caption each several times, aggregate into one dense caption.

Paper: "Patch Matters: Training-free Fine-grained Image Caption Enhancement via Local Perception" (CVPR 2025);
the facts implemented are in RESEARCH.md §5. Graph::

    intake → caption_global → ground → divide → caption_patches → aggregate → merge → END

- ``caption_global``: the question (e.g. "Describe the image in detail.") on the whole image, once, greedy.
- ``ground``: the objects the global caption names (`patch_matters_parts.object_phrases`) are grounded with a
  `foveate.tools.grounding` backend: ``attention`` (ViCrop rel-att, white-box backends; the offline default),
  ``vlm`` (the model's own ``bbox_2d`` boxes) or ``none``.
- ``divide``: four quadrants, each enlarged to hold every grounded box with more than 30 % of its area inside it,
  plus the semantic main box (union of the grounded boxes) when its IoU with the whole image is below 0.4.
- ``caption_patches``: the question on every patch crop, ``samples`` (3) completions each at temperature 0.7,
  all patches in ONE batched ``policy.chat`` (``n=3``); sample ``k`` of patch ``i`` is completion ``k`` of
  conversation ``i`` (the reference indexes a flat list as ``[i], [i+1], [i+2]``, mixing patches: not done here).
- ``aggregate``: each patch's samples are cut into sentences (`tools.sentences.split_sentences`) and grouped with
  MiniLM embeddings (`patch_matters_parts.group_samples`): similar (≥ 2 samples agree, cosine ≥ 0.9) → kept once;
  contradictory (same topic, cosine ≥ 0.75) and unique → scored against the crop: on white-box backends the
  VLM's yes-likelihood ``p(yes) / (p(yes) + p(no))`` for "Is there {claim} in the image?", the claim being the
  object the sentence names ("a medium yellow star", without the crop-relative "in the bottom right":
  `patch_matters_parts.claim`) (``choice_logprobs`` over the doubtful sentences of every patch that the merge
  could still add, in batches of 32 questions: yes and no read from one forward row, each crop through the
  vision tower once per batch; with the deterministic merge a sentence naming no object or repeating the global
  caption is dropped there whatever it scores, so it is not scored; a look-first model is scored on its own
  ``<think>{claim} yes</think>yes`` form); elsewhere embedding agreement (the sentence's best cosine with the
  other samples and the global caption). Kept: the best contradictory alternative and unique sentences scoring
  above ``keep`` (0.45; the paper's 0.3 is for its matching model, see the deviations).
- ``merge``: patches whose boxes overlap with IoU > 0.4 are merged, then the regions are merged into the global
  caption without duplicates. With an LLM configured (``merge_model``: a model directory / id, or ``"self"`` for
  the VLM itself) both merges are LLM prompts (each level one batched call; regions are given with boxes
  normalised to 0-1 as in the paper). Otherwise a deterministic merge on the MiniLM embeddings: a region's text is
  its patches' sentences without near-duplicates (cosine ≥ 0.9), and the caption is the global caption followed,
  per region, by the sentences that name an object and duplicate nothing already said ("In the top-left part:
  …"). Sentences naming no object (`object_phrases` finds none: "A 336x336 image with a beige background", "It
  shows 3 objects") describe the crop as a whole, not the image, and are left out.

Every step is traced: the global call, the grounding (phrases, boxes, reasons), each patch crop with its box, each
patch's samples, every grouping decision and score, and both merges.

Deviations from the paper, and why:
- The paper's detector is an open-vocabulary detector run on the image; here the phrases to ground come from the
  global caption, so only objects the global caption names can enlarge a quadrant (no detector exists offline
  here; `DetectorGrounder` takes one when a user has it).
- Contradiction and uniqueness are decided by embedding cosine bands instead of an LLM judge; the cosines are
  MiniLM's, the bands documented in `configs/patch_matters.yaml`.
- The paper's image-text score is a separate matching model; the VLM's own yes-likelihood stands in (no such
  model can be had offline), or embedding agreement on black-box backends. It asks about the object a sentence
  names, not the whole sentence, and its threshold is re-chosen for it (0.45 for the demo model, on world scenes
  of a seed the eval does not use; `configs/patch_matters.yaml`).
- Without an LLM the merges are deterministic (above): a patch's sentences about positions stay relative to its
  crop, so regions are prefixed with where they lie.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate import protocol
from foveate.agents.patch_matters_parts import (
    Grouping,
    claim,
    divide,
    group_samples,
    join_sentences,
    merge_overlapping,
    new_sentences,
    object_phrases,
    region_name,
    select_sentences,
    union,
)
from foveate.agents.state import (
    AgentState,
    FoveateContext,
    image_refs,
    intake,
    prompt_for_trace,
    resolve_context,
    to_policy_messages,
)
from foveate.errors import FoveateError
from foveate.policies.base import SamplingParams, WhiteBoxPolicy
from foveate.policies.look_first import looks_first
from foveate.tools.boxes import Box
from foveate.tools.crop import crop as crop_image
from foveate.tools.sentences import default_embedder, split_sentences
from foveate.trace import answer_step, crop_step, model_call_step, tool_call_step

GROUNDERS = ("auto", "attention", "vlm", "none")
SCORERS = ("auto", "likelihood", "embedding")
SCORE_QUESTION = "Is there {claim} in the image?"
SCORE_BATCH = 32  # sentences per choice_logprobs call (one row each; two on a look-first model)
MERGE_PATCH_PROMPT = (
    "These sentences describe overlapping parts of one image. Rewrite them as one description that keeps every "
    "detail once and repeats nothing.\n{sentences}"
)
MERGE_GLOBAL_PROMPT = (
    "Here is a description of a whole image:\n{caption}\n\nHere are descriptions of regions of it, each with its "
    "box [x1, y1, x2, y2] as fractions of the image:\n{regions}\n\nRewrite the description of the whole image so "
    "that it also contains every detail of the regions that it lacks, correcting it where a region contradicts "
    "it, without repeating anything."
)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class PatchMattersConfig:
    """Patch Matters' options; defaults and help in configs/patch_matters.yaml."""

    grounder: str = _help("auto | attention | vlm | none", "auto")
    attention_layer: int = _help("decoder layer of the attention grounder", 0)
    max_phrases: int = _help("at most this many caption phrases are grounded", 12)
    inside: float = _help("a box enlarges a quadrant when more than this share of it lies inside", 0.3)
    main_iou: float = _help("the main box is a patch only when its IoU with the image is below this", 0.4)
    samples: int = _help("captions sampled per patch", 3)
    temperature: float = _help("sampling temperature of the patch captions", 0.7)
    seed: int = _help("sampling seed of the patch captions", 0)
    caption_tokens: int | None = _help("max new tokens per caption; null = the run's max_new_tokens", None)
    similar: float = _help("cosine at or above which sentences of two samples agree", 0.9)
    contradict: float = _help("cosine at or above which sentences of two samples are about the same thing", 0.75)
    scorer: str = _help("auto | likelihood | embedding: how doubtful sentences are scored against the crop", "auto")
    keep: float = _help("doubtful sentences scoring above this are kept (the paper: 0.3; here 0.45)", 0.45)
    look_first: str = _help("auto | on | off: score a look-first model on its <think> form", "auto")
    merge_iou: float = _help("patches whose boxes overlap with IoU above this are merged", 0.4)
    duplicate: float = _help("cosine at or above which a sentence repeats one already in the caption", 0.9)
    merge_model: str | None = _help("LLM for the merges: a model dir / id, 'self' (the VLM); null = embeddings", None)
    merge_endpoint: str | None = _help("OpenAI-compatible endpoint serving merge_model", None)

    def __post_init__(self) -> None:
        checks = [
            (self.grounder in GROUNDERS, f"grounder must be one of {GROUNDERS}"),
            (self.scorer in SCORERS, f"scorer must be one of {SCORERS}"),
            (self.look_first in ("auto", "on", "off"), "look_first must be auto, on or off"),
            (self.samples >= 1 and self.max_phrases >= 0, "samples must be >= 1 and max_phrases >= 0"),
            (0 <= self.contradict <= self.similar <= 1, "need 0 <= contradict <= similar <= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise FoveateError(f"patch-matters: {message}")


@functools.cache
def _defaults() -> dict[str, Any]:
    """configs/patch_matters.yaml, read once per process (every node reads the options: 6 parses per image)."""
    source = Path(str(resources.files("foveate.configs").joinpath("patch_matters.yaml")))
    return yaml.safe_load(source.read_text()) or {}


def load_config(**overrides: Any) -> PatchMattersConfig:
    """configs/patch_matters.yaml with ``overrides``; unknown or invalid options fail with the valid ones."""
    merged = {**_defaults(), **overrides}
    names = [f.name for f in fields(PatchMattersConfig)]
    unknown = sorted(set(merged) - set(names))
    if unknown:
        raise FoveateError(f"patch-matters has no option {', '.join(unknown)}; its options: {', '.join(names)}")
    return PatchMattersConfig(**merged)


def _options(config: RunnableConfig | None) -> PatchMattersConfig:
    return load_config(**((config or {}).get("configurable", {}) or {}).get("patch_matters", {}))


class PatchMattersState(AgentState, total=False):
    global_caption: str
    phrases: list[str]
    grounded: list[list[float]]  # one box per grounded phrase (original pixels)
    patches: list[dict[str, Any]]  # {"name", "box", "crop"}
    samples: list[list[str]]  # per patch, its sampled captions
    patch_texts: list[list[str]]  # per patch, the kept sentences


def _user(image: Any, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _caption_params(context: FoveateContext, options: PatchMattersConfig, **extra: Any) -> SamplingParams:
    return context.sampling(max_new_tokens=options.caption_tokens or context.max_new_tokens, **extra)


# ---- nodes --------------------------------------------------------------------------------------------------
def intake_node(state: PatchMattersState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def caption_global_node(state: PatchMattersState, runtime: Runtime[FoveateContext], config: RunnableConfig):
    context, options = resolve_context(runtime), _options(config)
    messages = to_policy_messages(state["messages"], context.store)
    result = context.policy.chat([messages], _caption_params(context, options, temperature=0.0))[0]
    caption = protocol.strip_thought(result.text)
    prompt = prompt_for_trace(messages, image_refs(state["messages"]))
    return {"global_caption": caption, "steps": [model_call_step("caption_global", prompt, result)]}


def _grounder(policy: Any, options: PatchMattersConfig):
    from foveate.tools.grounding import AttentionGrounder, VLMGrounder

    kind = options.grounder
    if kind == "auto":
        kind = "attention" if isinstance(policy, WhiteBoxPolicy) else "vlm"
    if kind == "attention":
        return AttentionGrounder(policy, options.attention_layer)
    return VLMGrounder(policy) if kind == "vlm" else None


def ground_node(state: PatchMattersState, runtime: Runtime[FoveateContext], config: RunnableConfig):
    context, options = resolve_context(runtime), _options(config)
    phrases = object_phrases(split_sentences(state["global_caption"]), options.max_phrases)
    grounder = _grounder(context.policy, options)
    boxes: list[list[float]] = []
    found: list[Any] = []
    error = None
    if grounder is not None and phrases:
        try:
            found = grounder.ground(context.store.get(state["image"]), phrases)
        except FoveateError as failure:  # e.g. a black-box backend asked for attention: divide without boxes
            error = f"{type(failure).__name__}: {failure}"
    for regions in found:
        if regions:
            boxes.append(regions[0].box.to_list())
    arguments = {"phrases": phrases, "grounder": type(grounder).__name__ if grounder else "none"}
    result = [[{"box": r.box.to_list(), "score": round(r.score, 4)} for r in regions] for regions in found]
    step = tool_call_step("ground", "grounding", arguments, result=str(result) if not error else None, error=error)
    return {"phrases": phrases, "grounded": boxes, "steps": [step]}


def divide_node(state: PatchMattersState, runtime: Runtime[FoveateContext], config: RunnableConfig):
    context, options = resolve_context(runtime), _options(config)
    image = context.store.get(state["image"])
    boxes = [Box(*b) for b in state.get("grounded", [])]
    patches, steps = [], []
    for patch in divide(image.size, boxes, boxes, inside=options.inside, main_iou=options.main_iou):
        region, used = crop_image(image, patch.box)
        ref = context.store.put(region)
        grown = f", enlarged by grounded boxes {list(patch.enlarged_by)}" if patch.enlarged_by else ""
        reason = patch.name + grown
        steps.append(crop_step("divide", state["image"], used.to_list(), ref, reason=reason))
        patches.append({"name": patch.name, "box": used.to_list(), "crop": ref})
    return {"patches": patches, "steps": steps}


def caption_patches_node(state: PatchMattersState, runtime: Runtime[FoveateContext], config: RunnableConfig):
    context, options = resolve_context(runtime), _options(config)
    question = state["question"]
    conversations = [_user(context.store.get(p["crop"]), question) for p in state["patches"]]
    params = _caption_params(context, options, temperature=options.temperature, n=options.samples, seed=options.seed)
    results = context.policy.chat(conversations, params)  # every patch's samples in one batched call
    samples, steps = [], []
    for patch, result in zip(state["patches"], results, strict=True):
        samples.append([protocol.strip_thought(c.text) for c in result.completions])
        prompt = prompt_for_trace(_user(None, question), [patch["crop"]])
        steps.append(model_call_step("caption_patches", prompt, result, patch=patch["name"], box=patch["box"]))
    return {"samples": samples, "steps": steps}


def likelihood_scores(policy: Any, store: Any, items: list[tuple[str, str]], look_first: bool) -> list[float]:
    """p(yes) / (p(yes) + p(no)) of "Is there {claim} in the image?" on each (crop ref, sentence), where the claim
    is the object the sentence names (`patch_matters_parts.claim`: "a medium yellow star", not "… in the bottom
    right", a position relative to the crop).

    Sentences of one crop that name the same object are asked once. One ``choice_logprobs`` call per
    `SCORE_BATCH` questions: yes and no are read from one row's next-token distribution (a look-first model's
    two answers differ inside the think span: one row each) and each crop goes through the vision tower once per
    call, however many of its sentences are scored. Each crop is decoded from the store once."""
    asked = [(ref, claim(sentence)) for ref, sentence in items]
    questions = list(dict.fromkeys(asked))
    crops = {ref: store.get(ref) for ref in dict.fromkeys(ref for ref, _ in questions)}
    conversations, choices = [], []
    for ref, text in questions:
        conversations.append(_user(crops[ref], SCORE_QUESTION.format(claim=text)))
        words = ("yes", "no")
        choices.append([protocol.look_answer([text], w) for w in words] if look_first else list(words))
    logprobs: list[list[float]] = []
    for start in range(0, len(conversations), SCORE_BATCH):  # bounded batches: a patch can have dozens of sentences
        end = start + SCORE_BATCH
        logprobs += policy.choice_logprobs(conversations[start:end], choices[start:end])
    by_question = {
        question: 1.0 / (1.0 + math.exp(min(700.0, no - yes)))
        for question, (yes, no) in zip(questions, logprobs, strict=True)
    }
    return [by_question[question] for question in asked]


def _embedding_scores(groupings: list[Grouping], samples: list[list[list[str]]], caption: str) -> list[list[float]]:
    """Per patch, each doubtful sentence's best cosine with the other samples' sentences and the global caption."""
    embed = default_embedder().embed
    out = []
    for grouping, sentences in zip(groupings, samples, strict=True):
        doubtful = grouping.doubtful()
        others = [s for sample in sentences for s in sample] + split_sentences(caption)
        if not doubtful or not others:
            out.append([0.0] * len(doubtful))
            continue
        cosine = embed(doubtful) @ embed(others).T
        cosine[cosine >= 0.999] = -1.0  # the sentence itself
        out.append([float(max(0.0, row.max())) for row in cosine])
    return out


def _could_be_added(groupings: list[Grouping], caption: str, options: PatchMattersConfig) -> set[str]:
    """Doubtful sentences the merge could still add: all of them for an LLM merge; for the deterministic merge only
    those naming an object and not repeating the global caption (the rest are dropped there whatever they score,
    so scoring them is wasted model work)."""
    doubtful = list(dict.fromkeys(s for g in groupings for s in g.doubtful()))
    if options.merge_model or options.merge_endpoint:
        return set(doubtful)
    named = [s for s in doubtful if object_phrases([s])]
    known = split_sentences(caption)
    if not named or not known:
        return set(named)
    embed = default_embedder().embed
    best = (embed(named) @ embed(known).T).max(axis=1)
    return {text for text, cosine in zip(named, best, strict=True) if cosine < options.duplicate}


def aggregate_node(state: PatchMattersState, runtime: Runtime[FoveateContext], config: RunnableConfig):
    context, options = resolve_context(runtime), _options(config)
    embed = default_embedder().embed
    split = [[split_sentences(text) for text in patch_samples] for patch_samples in state["samples"]]
    embed([s for patch in split for sample in patch for s in sample])  # one batch for every patch (then cached)
    groupings = [group_samples(s, embed, similar=options.similar, contradict=options.contradict) for s in split]
    scorer = options.scorer
    if scorer == "auto":
        scorer = "likelihood" if isinstance(context.policy, WhiteBoxPolicy) else "embedding"
    if options.keep >= 1.0:  # no score exceeds 1: agreement alone decides, nothing needs scoring
        scorer = "none"
        scores = [[0.0] * len(g.doubtful()) for g in groupings]
    elif scorer == "likelihood":
        useful = _could_be_added(groupings, state["global_caption"], options)
        items = [(p["crop"], s) for p, g in zip(state["patches"], groupings, strict=True) for s in g.doubtful()]
        wanted = [i for i, (_, sentence) in enumerate(items) if sentence in useful]
        look_first = options.look_first == "on" or (
            options.look_first == "auto"
            and isinstance(context.policy, WhiteBoxPolicy)
            and looks_first(context.policy.model_dir)
        )
        measured = likelihood_scores(context.policy, context.store, [items[i] for i in wanted], look_first)
        flat = [0.0] * len(items)  # a sentence that can never enter the caption is not scored (and not kept)
        for i, value in zip(wanted, measured, strict=True):
            flat[i] = value
        scores, index = [], 0
        for grouping in groupings:
            count = len(grouping.doubtful())
            scores.append(flat[index : index + count])
            index += count
    else:
        scores = _embedding_scores(groupings, split, state["global_caption"])
    patch_texts, steps = [], []
    for patch, grouping, patch_scores in zip(state["patches"], groupings, scores, strict=True):
        by_sentence = dict(zip(grouping.doubtful(), patch_scores, strict=True))
        kept = select_sentences(grouping, by_sentence, options.keep)
        patch_texts.append(kept)
        arguments = {"patch": patch["name"], "box": patch["box"], "scorer": scorer, "keep_above": options.keep}
        decisions = [
            {**d, "scores": [round(by_sentence.get(s, 1.0), 4) for s in d["sentences"]]} for d in grouping.decisions
        ]
        steps.append(tool_call_step("aggregate", "group_samples", {**arguments, "groups": decisions}, str(kept)))
    return {"patch_texts": patch_texts, "steps": steps}


def _merge_policy(context: FoveateContext, options: PatchMattersConfig):
    if not options.merge_model and not options.merge_endpoint:
        return None
    if options.merge_model == "self":
        return context.policy
    from foveate.policies.factory import make_policy

    return make_policy(options.merge_model, options.merge_endpoint)


def _text_turn(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def merge_node(state: PatchMattersState, runtime: Runtime[FoveateContext], config: RunnableConfig):
    context, options = resolve_context(runtime), _options(config)
    image_size = context.store.get(state["image"]).size
    boxes = [Box(*p["box"]) for p in state["patches"]]
    groups = merge_overlapping(list(zip(boxes, state["patch_texts"], strict=True)), options.merge_iou)
    llm = _merge_policy(context, options)
    embed = default_embedder().embed
    regions: list[tuple[Box, list[str]]] = []
    names: list[str] = []
    steps: list[dict[str, Any]] = []
    pending = []
    for group in groups:
        box = union([boxes[i] for i in group])
        main = [state["patches"][i]["name"] for i in group] == ["main"]
        names.append("the main region" if main else f"the {region_name(box, image_size)} part")
        sentences = [s for i in group for s in state["patch_texts"][i]]
        if llm is not None and len(group) > 1 and sentences:
            pending.append((box, sentences, len(regions)))
        regions.append((box, [text for text, _ in new_sentences(sentences, [], embed, options.duplicate)]))
    params = _caption_params(context, options, temperature=0.0)
    if pending:  # neighbours merged by the LLM, one batched call
        prompts = [MERGE_PATCH_PROMPT.format(sentences="\n".join(f"- {s}" for s in sents)) for _, sents, _ in pending]
        results = llm.chat([_text_turn(p) for p in prompts], params)
        for (box, _, index), prompt, result in zip(pending, prompts, results, strict=True):
            regions[index] = (box, [protocol.strip_thought(result.text)])
            steps.append(model_call_step("merge", _text_turn(prompt), result, merged="patches"))
    steps.append(tool_call_step("merge", "merge_patches", {"groups": groups, "iou_above": options.merge_iou}))
    caption = state["global_caption"]
    if llm is not None:
        lines = []
        for box, texts in regions:
            if texts:
                frac = [round(v / s, 3) for v, s in zip(box.to_list(), (*image_size, *image_size), strict=True)]
                lines.append(f"- {frac}: {' '.join(texts)}")
        prompt = MERGE_GLOBAL_PROMPT.format(caption=caption, regions="\n".join(lines))
        result = llm.chat([_text_turn(prompt)], params)[0]
        steps.append(model_call_step("merge", _text_turn(prompt), result, merged="global"))
        final = protocol.strip_thought(result.text).strip() or caption
    else:
        known = split_sentences(caption)
        parts = [caption.strip()]
        added = []
        for (box, texts), name in zip(regions, names, strict=True):
            about_objects = [text for text in texts if object_phrases([text])]  # not the crop's size, count, …
            fresh = new_sentences(about_objects, known, embed, options.duplicate)
            known += [text for text, _ in fresh]
            if fresh:
                parts.append(f"In {name}: {join_sentences([t for t, _ in fresh])}")
                added.append({"region": name, "box": box.to_list(), "sentences": [[t, round(c, 4)] for t, c in fresh]})
        steps.append(tool_call_step("merge", "merge_global", {"duplicate_at": options.duplicate, "added": added}))
        final = " ".join(p for p in parts if p)
    return {"answer": final, "messages": [AIMessage(content=final)], "steps": [*steps, answer_step("merge", final)]}


def build(checkpointer: Any = None, **options: Any):
    """The compiled Patch Matters graph; ``options`` are `PatchMattersConfig` fields."""
    load_config(**options)  # unknown or invalid options fail here, not mid-run
    builder = StateGraph(PatchMattersState, context_schema=FoveateContext)
    for name, node in (
        ("intake", intake_node),
        ("caption_global", caption_global_node),
        ("ground", ground_node),
        ("divide", divide_node),
        ("caption_patches", caption_patches_node),
        ("aggregate", aggregate_node),
        ("merge", merge_node),
    ):
        builder.add_node(name, node)
    builder.add_edge(START, "intake")  # normalise the input
    builder.add_edge("intake", "caption_global")  # one global caption first: it names the objects
    builder.add_edge("caption_global", "ground")  # locate what it names
    builder.add_edge("ground", "divide")  # quadrants grown around those objects (+ the main box)
    builder.add_edge("divide", "caption_patches")  # every patch sampled, one batched call
    builder.add_edge("caption_patches", "aggregate")  # keep what samples agree on or the crop supports
    builder.add_edge("aggregate", "merge")  # merge overlapping patches, then into the global caption
    builder.add_edge("merge", END)
    graph = builder.compile(checkpointer=checkpointer, name="patch-matters")
    return graph.with_config({"configurable": {"patch_matters": options}}) if options else graph


graph = build()
