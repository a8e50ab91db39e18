"""Supervised examples for the demo VLM, built from the synthetic world's exact ground truth.

Every example is a chat (`messages` with PIL images) whose assistant turns are the training targets. Formats,
all with prompts from `foveate.protocol` so strategies and training agree:

- ``qa``: image + question → short answer (every question family of the world); with ``look_first`` the answer
  first restates the objects it depends on: ``<think>the red star blue</think>blue``.
- ``qa_crop``: image + a crop around the evidence + question → answer. The crop is a square window like the
  ones ViCrop and the oracle-crop strategy produce (side = a few times the evidence, at least about the model's
  input side), jittered so the target is not always centred. This is what makes a second, zoomed image useful.
- ``ground``: "Locate the …" → ``{"bbox_2d": [x1, y1, x2, y2]}`` in 0–1000 of the image size.
- ``describe``: the reference dense description.
- ``deepeyes``: ``<think>…</think>`` then a zoom tool call on the evidence window (small targets) or a direct
  ``<answer>`` (large ones); the crop comes back as a tool turn; then ``<think>…</think><answer>…</answer>``.
- ``visrl``: first a focus box, then (given the crop) the answer.

The stream is endless and seeded; each scene yields several examples so rendering is amortised. With
`DataMix.chat_turns` above 1, a scene's qa and ground examples become multi-turn chats (`chat_examples`): the
image once, then one user / assistant turn per question, so one vision pass serves several answers, as LLaVA's
instruction data asks many questions of one image. A turn joins a chat only if the chat's text so far cannot
answer it (`leaks`).

The `bench/…` diagnostics and `configs/probes/…` recipes cited here measured the demo model while it was built;
they left the tree with the rest of the lab notebook (`git log --diff-filter=D --stat -- bench/ configs/probes/`
lists them; the model card, foveate/assets/models/demo/README.md, sums up what they found).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from foveate import protocol
from foveate.rl import sft_roles
from foveate.tools.boxes import Box, to_thousand
from foveate.tools.crop import crop
from foveate.world import iter_scenes, render_scene, unique_reference
from foveate.world.phrasings import rephrase
from foveate.world.presets import ZoomWorldConfig, get_preset
from foveate.world.questions import FAMILIES, generate_questions
from foveate.world.questions import referents as world_referents
from foveate.world.scenes import Scene

Example = dict[str, Any]


@dataclass
class DataMix:
    """Which example formats and world presets the stream draws, and how often (weights, not fractions)."""

    formats: dict[str, float] = field(
        default_factory=lambda: {
            "qa": 3.0,
            "qa_crop": 2.0,
            "ground": 2.0,
            "describe": 0.3,
            "deepeyes": 1.5,
            "visrl": 1.0,
        }
    )
    presets: dict[str, float] = field(
        default_factory=lambda: {"default": 0.4, "large": 0.25, "small-detail": 0.25, "cluttered": 0.1}
    )
    crop_scale: tuple[float, float] = (2.0, 4.0)  # crop side / evidence long side
    crop_min_side: tuple[int, int] = (180, 320)  # crop side lower bound in original pixels (≈ model input side)
    describe_max_chars: int = 400  # long descriptions are cut at a sentence boundary to bound sequence length
    one_per_scene: bool = False  # only a scene's first example (vision pretraining: no image twice in a batch)
    zoom_sizes: tuple[str, ...] = ("tiny", "small")  # DeepEyes targets of these sizes are zoomed; others answered
    # Only questions of these kinds, each "family" or "family/subtype" (e.g. "attribute/color"); empty = all.
    questions: tuple[str, ...] = ()
    # qa / qa_crop answers name what they look at first, "<think>the red star blue</think>blue" (protocol.look_answer).
    # Why: bench/binding_symbolic.py's decoder reads a random object for 2100 steps with a bare answer and binds
    # the named one in about 450 steps when the answer is predicted at the referent's word.
    look_first: bool = False
    # What a look-first existence thought says (`existence_percept`): "referent" restates "a green star";
    # "percept" says what the colour's lookup finds, "green circle", so "no" follows from a visible mismatch.
    existence_thought: str = "referent"
    # Look-first thoughts drop a referent's trailing "object" ("the red object" -> "the red"), so a shape answer is
    # predicted AT the colour word it is looked up by (`key_phrase`). Off in the recipes trained before it.
    look_trim_object: bool = False
    # A scene's qa and ground examples are asked as chats of up to this many turns: the scene image once, then a
    # user / assistant turn per question (`chat_examples`); 1 = one question per example. Why: a chat costs one
    # vision pass for all its answers, and the attention loss supervises every turn (rl.attention_supervision).
    chat_turns: int = 1
    # Questions drawn per scene (inclusive range) instead of the preset's 1-3, so chats have turns to hold;
    # None = the preset's. The stream's own seed draws them (world.questions.generate_questions).
    scene_questions: tuple[int, int] | None = None
    # Family weights for the questions `scene_questions` draws ("attribute": 4.0, …), in place of the preset's, so a
    # stage can spend its answers on the families it is meant to teach without dropping the others; None = the
    # preset's. Needs `scene_questions` (the preset's own rows keep the preset's weights).
    family_weights: dict[str, float] | None = None
    # Whether each question also gets a second, different format (more supervision per rendered scene). Off, a
    # question gets one format, so the formats' weights are the shares of the questions: a stage can make chats of
    # qa answers most of its examples instead of one single-question example beside every question.
    second_format: bool = True
    # DeepEyes examples carry the zoom tool's schema (``tools``), so the chat template renders it in a system turn
    # as TRL's GRPOTrainer does for its environment's tool: the warm start before DeepEyes GRPO
    # (configs/rl/deepeyes-warmstart.yaml) then trains on exactly the prompts GRPO samples from.
    deepeyes_tools: bool = False
    # A qa example of a small-detail row (its target illegible at the model's input) is asked with its crop instead
    # (qa_crop). Why: without the crop such an answer can only be guessed, and the model learns the guess. Measured
    # (stage 7 with it off): on world:zoom's multiple-choice items, whose options are in the question, the oracle
    # crop scored 27.0 (chance 25) against 51.3 on the open items: it had learned to pick an option from the text.
    crop_small_details: bool = False
    # Probability that a question row is reworded from the "train" phrasing pool (`foveate.world.phrasings`: "does
    # the image contain a red star?", negations, "colour", "the red thing" …) instead of the world's one template
    # per family. Why: trained on the templates alone the demo model keys on them (issue 32); the "heldout" pool
    # (`foveate eval --task world:<preset>@heldout`) measures wordings it never saw.
    phrasings: float = 0.0

    def __post_init__(self) -> None:
        # Checked here, so a recipe with a misspelt family fails when it is read, not when its stage starts.
        unknown = {kind.split("/")[0] for kind in self.questions} - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown question families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
        if self.existence_thought not in EXISTENCE_THOUGHTS:
            raise ValueError(f"existence_thought must be one of {EXISTENCE_THOUGHTS}, not {self.existence_thought!r}")
        if not 0.0 <= self.phrasings <= 1.0:
            raise ValueError(f"phrasings is a probability in [0, 1], not {self.phrasings}")
        if self.chat_turns < 1:
            raise ValueError(f"chat_turns must be at least 1, not {self.chat_turns}")
        if self.formats.get("copy") and not self.look_first:
            raise ValueError("format copy restates a look-first thought: it needs look_first: true")
        if self.scene_questions is not None and not 1 <= self.scene_questions[0] <= self.scene_questions[1]:
            raise ValueError(f"scene_questions must be (low, high) with 1 <= low <= high, not {self.scene_questions}")
        if self.family_weights is not None:
            if self.scene_questions is None:
                raise ValueError("family_weights weights the questions scene_questions draws: set scene_questions")
            unknown_families = set(self.family_weights) - set(FAMILIES)
            if unknown_families or not any(weight > 0 for weight in self.family_weights.values()):
                raise ValueError(f"family_weights needs families of {sorted(FAMILIES)} with some weight above 0")


EXISTENCE_THOUGHTS = ("referent", "percept")
MAX_SKIPPED_SCENES = 1000  # consecutive scenes without a question of the asked kinds before the stream gives up


def asks(row: dict[str, Any], kinds: tuple[str, ...]) -> bool:
    """Whether a world question row is of one of `kinds` ("family" or "family/subtype"); empty `kinds` = any."""
    return not kinds or row["family"] in kinds or f"{row['family']}/{row['subtype']}" in kinds


def evidence_window(boxes: list[list[float]], image_size: tuple[int, int], rng: random.Random, mix: DataMix) -> Box:
    """A jittered square window around the union of the evidence boxes, inside the image."""
    width, height = image_size
    x1 = min(b[0] for b in boxes)
    y1 = min(b[1] for b in boxes)
    x2 = max(b[2] for b in boxes)
    y2 = max(b[3] for b in boxes)
    long_side = max(x2 - x1, y2 - y1)
    side = max(long_side * rng.uniform(*mix.crop_scale), rng.uniform(*mix.crop_min_side))
    side = min(side, width, height)
    # Place the window so the evidence stays inside it, anywhere within that freedom.
    left = rng.uniform(max(0, x2 - side), max(0, min(x1, width - side)))
    top = rng.uniform(max(0, y2 - side), max(0, min(y1, height - side)))
    return Box(left, top, left + side, top + side).clamp(width, height)


def _user(*parts: Any) -> dict[str, Any]:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return {"role": "user", "content": content}


def _assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def _thousand(box: Box | list[float], image_size: tuple[int, int]) -> list[float]:
    box = box if isinstance(box, Box) else Box(*box)
    return to_thousand(box, image_size)


def existence_percept(row: dict[str, Any], scene: Scene) -> str | None:
    """What looking up an existence question's colour finds: ``green star`` when a green star is there, else the
    shape of the largest green object (``green circle``), else ``green none``; None for other question rows.

    Why (`DataMix.existence_thought`): with the referent restated (``<think>a green star yes``), v9's thought
    named the shape of the green object it saw instead of copying the question's (0.36 named right on `simple`
    scenes, 0.44 on `large`; 78-86 % "yes", `bench/look_first.py`, `foveate eval`). Here the thought IS that
    lookup, and the answer is the comparison of its shape with the question's. One colour lookup decides every
    POPE negative of the world: an adversarial negative shares either the colour (then another shape is named) or
    the shape (then the colour's lookup finds no star). "Largest" is by box area, the first listed on a tie (the
    question generator ranks by size class; the probes below were trained with this rule).

    Measured, it does not beat v9 (configs/probes/demo-v9-percept.yaml, demo-v9-existence-*.yaml): fine-tuned
    from v9 for 400 steps of the full mix the thought's copied colour stays at its prior; 300 steps of existence
    questions alone reach F1 0.48 on world:large (v9 0.47, the restated referent trained the same way 0.38) and
    name the true percept for 0.43 of the eval's 56 existence questions (`bench/look_first.py --seed 1000`).
    """
    # A rephrased row keeps its template text: the percept reads colour and shape from "a green star".
    question = row.get("source_question", row["question"])
    phrases = world_referents(question) if row.get("family") == "existence" else []
    if len(phrases) != 1 or len(phrases[0].split()) != 3:  # "a green star": one-word colours and shapes
        return None
    _article, color, shape = phrases[0].split()
    same_color = [obj for obj in scene.objects if obj.color == color]
    if any(obj.shape == shape for obj in same_color):
        return f"{color} {shape}"
    if not same_color:
        return f"{color} none"
    largest = max(same_color, key=lambda obj: Box(*obj.box).area)
    return f"{color} {largest.shape}"


def spoken_answer(row: dict[str, Any]) -> str:
    """The answer a training target states: the canonical one, or for a multiple-choice row (``scoring:
    "choice"``, the `zoom` preset's V*-style questions) the option's text, not its letter.

    Why the text: `choice_match` accepts either, and a look-first answer must end its thought with the answer
    (`policies.look_first.thought_prefix`) so ViCrop reads its map where the shape is looked up ("the red" →
    "star"); a letter would be decided at the options' text instead of at the image."""
    return row["answers"][1] if row.get("scoring") == "choice" else row["answers"][0]


def short_answer(row: dict[str, Any], mix: DataMix, scene: Scene | None = None) -> str:
    """The row's answer as a qa / qa_crop target: bare, or after its referents when `DataMix.look_first` (after
    the colour's percept for existence questions with ``existence_thought="percept"``)."""
    answer = spoken_answer(row)
    if not mix.look_first:
        return answer
    if mix.existence_thought == "percept" and row.get("family") == "existence":
        # Fail loudly: a silent fallback to the referent would train the other format without a word.
        percept = existence_percept(row, scene) if scene is not None else None
        if percept is None:
            raise ValueError(f"no existence percept for {row['question']!r} (scene given: {scene is not None})")
        return protocol.look_answer([percept], answer)
    referents = row_referents(row)
    if mix.look_trim_object:
        referents = [key_phrase(phrase) for phrase in referents]
    return protocol.look_answer(referents, answer) if referents else answer


def row_referents(row: dict[str, Any]) -> list[str]:
    """What a question row's answer depends on: its own ``referents`` (a reworded row, `foveate.world.phrasings`;
    a `zoom` row, whose multiple-choice text is no template) or those parsed from the world's template question."""
    return list(row["referents"]) if "referents" in row else world_referents(row["question"])


# The noun a referent ends on that names no attribute: the template's "object" and its rewordings'
# (foveate.world.phrasings).
REFERENT_NOUNS = ("object", "thing", "item", "shape")


def key_phrase(referent: str) -> str:
    """A look-first thought's referent ending on the word the lookup keys on: "the tiny red object" → "the tiny
    red"; a phrase that does not end with "object" (or is only "the object") is kept.

    Why (`DataMix.look_trim_object`): `bench/binding_symbolic.py`'s decoder binds only when the answer is predicted
    at the referent's own word; one token between them ("the red object circle": the shape is predicted at
    "object", one token after "red") leaves it at chance after 900 steps. That bench restates "red", never
    "object"; the world's shape questions name their object by colour, "the red object".

    Measured (configs/probes/demo-v10.yaml against demo-v9.yaml, the same stages, seeds and steps): shape read
    from one object goes from 0.38 to 0.80 after stage 3 (`python bench/first_token.py DIR --presets single
    --n 200`) and from 0.59 to 0.84 after stage 4; among 2-4 objects which object is read barely moves (shape
    right of named 0.65 / 0.46 / 0.41 → 0.66 / 0.39 / 0.51, colour 0.64 / 0.51 / 0.44 → 0.71 / 0.59 / 0.48 on 2 /
    3 / 4 objects, `python bench/binding.py DIR --n 600`, ± 0.06). Counting thoughts keep "blue objects".
    """
    words = referent.split()
    return " ".join(words[:-1]) if len(words) > 2 and words[-1] in REFERENT_NOUNS else referent


def qa(image: Image.Image, row: dict[str, Any], mix: DataMix, scene: Scene | None = None, **_: Any) -> Example:
    return {"messages": [_user(image, row["question"]), _assistant(short_answer(row, mix, scene))]}


def qa_crop(
    image: Image.Image, row: dict[str, Any], rng: random.Random, mix: DataMix, scene: Scene | None = None, **_: Any
) -> Example | None:
    if not row["boxes"]:
        return None
    window = evidence_window(row["boxes"], image.size, rng, mix)
    zoomed, used = crop(image, window)
    messages = [_user(image, zoomed, row["question"]), _assistant(short_answer(row, mix, scene))]
    return {"messages": messages}


def ground(image: Image.Image, scene: Scene, rng: random.Random, mix: DataMix, **_: Any) -> Example | None:
    candidates = [(obj, unique_reference(scene, obj)) for obj in scene.objects]
    candidates = [(obj, ref) for obj, ref in candidates if ref is not None]
    if not candidates:
        return None
    obj, (phrase, _) = rng.choice(candidates)
    prompt = protocol.GROUNDING_PROMPT.format(reference=phrase.removeprefix("the "))
    answer = protocol.box_json(_thousand(obj.box, image.size))
    return {"messages": [_user(image, prompt), _assistant(answer)], "evidence": [list(obj.box)]}


def describe(image: Image.Image, scene: Scene, mix: DataMix, **_: Any) -> Example:
    text = scene.description
    if len(text) > mix.describe_max_chars:
        cut = text.rfind(";", 0, mix.describe_max_chars)
        text = text[: cut if cut > 0 else mix.describe_max_chars].rstrip() + "."
    return {"messages": [_user(image, protocol.DESCRIBE_PROMPT), _assistant(text)]}


def deepeyes(image: Image.Image, row: dict[str, Any], rng: random.Random, mix: DataMix, **_: Any) -> Example:
    question = row["question"] + protocol.DEEPEYES_SUFFIX
    answer = spoken_answer(row)
    if not row["boxes"] or row.get("target_size") not in mix.zoom_sizes:
        final = protocol.think_answer("The answer is visible in the image.", answer)
        return _with_tools({"messages": [_user(image, question), _assistant(final)]}, mix)
    window = evidence_window(row["boxes"], image.size, rng, mix)
    zoomed, used = crop(image, window)
    call = {
        "type": "function",
        "function": {
            "name": protocol.ZOOM_TOOL_NAME,
            "arguments": {"bbox_2d": [int(v) for v in _thousand(window, image.size)]},
        },
    }
    messages = [
        _user(image, question),
        _assistant("<think>The detail is too small to see. I will zoom in.</think>\n", tool_calls=[call]),
        {"role": "tool", "content": [{"type": "image", "image": zoomed}]},
        _assistant(protocol.think_answer("Now the detail is visible.", answer)),
    ]
    return _with_tools({"messages": messages}, mix)


def _with_tools(example: Example, mix: DataMix) -> Example:
    """The example with the zoom tool's schema as TRL renders it for GRPO (`DataMix.deepeyes_tools`)."""
    if mix.deepeyes_tools:
        from foveate.rl.zoom_env import zoom_tool_schema

        example["tools"] = [zoom_tool_schema()]
    return example


def visrl(image: Image.Image, row: dict[str, Any], rng: random.Random, mix: DataMix, **_: Any) -> Example | None:
    if not row["boxes"]:
        return None
    window = evidence_window(row["boxes"], image.size, rng, mix)
    zoomed, used = crop(image, window)
    messages = [
        _user(image, row["question"] + protocol.VISRL_FOCUS_SUFFIX),
        _assistant(protocol.box_json(_thousand(window, image.size))),
        _user(zoomed, protocol.VISRL_ANSWER_PROMPT),
        _assistant(spoken_answer(row)),
    ]
    return {"messages": messages}


def copy_thought(
    image: Image.Image, rng: random.Random, mix: DataMix, foreign: list[dict[str, Any]] = (), **_: Any
) -> Example | None:
    """A question from ANOTHER scene, asked about this image, with only its look-first thought's referents as the
    target (``<think>the large pink``; no answer, no end of turn: `open_reply`). The referent is then unrelated to
    the image, so only copying the question's words predicts it.

    Why (format ``copy``): the demo model v11 restates the question's referent wrongly in its thought, and on a blank
    grey image just as often, so the fault is the text copy, not the image: teacher-forced, a colour word after a
    size word is copied for 0.63 of attribute questions ("the medium-sized purple" → "red") and "large" becomes
    "tiny" (`python bench/thought_copy.py DIR`). In ordinary examples the referent describes the object the image
    shows, so a prior over the scene's likely words competes with copying."""
    # With percept existence thoughts an existence question's thought is not its words: not a copy target.
    percept = mix.existence_thought == "percept"
    candidates = [r for r in foreign if row_referents(r) and not (percept and r["family"] == "existence")]
    if not mix.look_first or not candidates:
        return None
    row = rng.choice(candidates)
    referents = row_referents(row)
    if mix.look_trim_object:
        referents = [key_phrase(phrase) for phrase in referents]
    thought = protocol.THOUGHT_OPEN + "; ".join(referents)
    return {"messages": [_user(image, row["question"]), _assistant(thought)], "open_reply": True}


BUILDERS = {
    "qa": qa,
    "qa_crop": qa_crop,
    "ground": ground,
    "describe": describe,
    "deepeyes": deepeyes,
    "visrl": visrl,
    "copy": copy_thought,
    "proreason": sft_roles.proreason,  # agents.proreason's role turns (rl.sft_roles)
    "program": sft_roles.program,  # agents.vpd's programmer prompt -> the world's program (rl.sft_roles)
}
# Formats that need a question row; the others are built from the scene alone.
ROW_FORMATS = {"qa", "qa_crop", "deepeyes", "visrl", "proreason", "program"}
# One scene image, one question, one short reply: the formats `chat_examples` merges into chats. A description
# would state every answer of its scene, and crop formats carry images of their own.
CHAT_FORMATS = {"qa", "ground"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def leaks(chat: list[Example], example: Example) -> bool:
    """Whether `example` could be answered from `chat`'s text so far instead of from the image, or repeats it:
    - its question was asked already;
    - a word of its answer (after its thought) was said, or, for a box answer, the same box;
    - a yes / no answer whose question's referent words ("a pink square") were all said (the chat told whether
      such an object is there)."""
    said_text = [_text(m) for turn in chat for m in turn["messages"]]
    question = _text(example["messages"][0])
    if question in said_text:
        return True
    answer = protocol.strip_thought(example["messages"][-1]["content"])
    if example["format"] == "ground":
        return answer in said_text
    said = set().union(*(_words(text) for text in said_text))
    if _words(answer) & said:
        return True
    if answer in ("yes", "no"):
        referents = example.get("referents") or world_referents(question)
        nouns = {*REFERENT_NOUNS, *(noun + "s" for noun in REFERENT_NOUNS)}
        referent_words = _words(" ".join(referents)) - {"a", "an", "the", *nouns}
        return bool(referent_words) and referent_words <= said
    return False


def chat_examples(examples: list[Example], max_turns: int) -> list[Example]:
    """One scene's single-turn examples (`CHAT_FORMATS`) as chats of at most `max_turns` turns, in order; each
    example joins the first chat it does not `leak` into. A chat shows the scene image in its first turn only and
    records each turn's evidence boxes (``turn_evidence``, for rl.attention_supervision)."""
    chats: list[list[Example]] = []
    for example in examples:
        home = next((c for c in chats if len(c) < max_turns and not leaks(c, example)), None)
        if home is None:
            chats.append([example])
        else:
            home.append(example)
    return [_merge(chat) for chat in chats]


def _merge(chat: list[Example]) -> Example:
    first = chat[0]
    messages = list(first["messages"])
    for example in chat[1:]:
        user, reply = example["messages"]
        messages += [{"role": "user", "content": [p for p in user["content"] if p["type"] == "text"]}, reply]
    return {
        "messages": messages,
        "format": "chat" if len(chat) > 1 else first["format"],
        "scene": first["scene"],
        "evidence": first.get("evidence"),
        "turn_evidence": [example.get("evidence") for example in chat],
    }


def scene_rows(scene: Scene, rows: list[dict[str, Any]], preset: str, rng: random.Random, mix: DataMix) -> list:
    """The scene's question rows of the kinds `mix` asks: the preset's, or `mix.scene_questions` many drawn anew."""
    world = get_preset(preset)
    # A world with its own question generator (the `zoom` preset's V*-style questions) keeps its rows.
    if mix.scene_questions is not None and not isinstance(world, ZoomWorldConfig):
        questions = world.questions
        if mix.family_weights is not None:
            questions = dataclasses.replace(questions, family_weights=tuple(mix.family_weights.items()))
        rows = generate_questions(scene, rng, rng.randint(*mix.scene_questions), questions, world.scene)
    rows = [row for row in rows if asks(row, mix.questions)]
    if mix.phrasings:  # the stream's rng draws nothing more when off: streams without phrasings are unchanged
        n_objects = len(scene.objects)
        rows = [rephrase(row, rng, "train", n_objects) if rng.random() < mix.phrasings else row for row in rows]
    return rows


def scene_examples(
    image: Image.Image,
    scene: Scene,
    rows: list[dict[str, Any]],
    rng: random.Random,
    mix: DataMix,
    foreign: list[dict[str, Any]] = (),
):
    """Every example of one scene: two different formats per question (more supervision per rendered scene, no
    duplicates); one format per question with `one_per_scene`, without `second_format` or with a one-format mix.
    ``foreign``: the previous scene's question rows (the ``copy`` format asks them about this image)."""
    format_names, format_weights = zip(*mix.formats.items(), strict=True)
    for row in rows[:1] if mix.one_per_scene else rows:
        first = rng.choices(format_names, format_weights)[0]
        others = [(n, w) for n, w in zip(format_names, format_weights, strict=True) if n != first]
        names = [first]
        if others and mix.second_format and not mix.one_per_scene:
            names.append(rng.choices([n for n, _ in others], [w for _, w in others])[0])
        if mix.crop_small_details and row.get("split") == "small-detail":
            names = list(dict.fromkeys("qa_crop" if name == "qa" else name for name in names))
        for name in names:
            kwargs = {"image": image, "row": row, "scene": scene, "rng": rng, "mix": mix, "foreign": foreign}
            example = BUILDERS[name](**kwargs)
            if example is not None:
                example["format"] = name
                # The ground truth of the example's first image (rl.vision_aux); a text-only builder sets None.
                example.setdefault("scene", scene)
                if name in ROW_FORMATS:  # the question's evidence boxes (rl.attention_supervision), unless set
                    example.setdefault("evidence", row["boxes"])
                if "referents" in row:  # a reworded question's own referents (`leaks` cannot parse its text)
                    example["referents"] = row["referents"]
                yield example


def example_stream(seed: int, mix: DataMix | None = None) -> Iterator[Example]:
    """Endless seeded stream of training examples mixing formats and presets as `mix` says."""
    mix = mix or DataMix()
    rng = random.Random(f"foveate-sft/{seed}")
    streams = {name: iter_scenes(seed, name) for name in mix.presets}
    preset_names, preset_weights = zip(*mix.presets.items(), strict=True)
    skipped, foreign = 0, []
    while True:
        preset = rng.choices(preset_names, preset_weights)[0]
        scene, rows = next(streams[preset])
        rows = scene_rows(scene, rows, preset, rng, mix)
        skipped = 0 if rows else skipped + 1
        if skipped >= MAX_SKIPPED_SCENES:  # a misspelt subtype, or one the presets never ask: fail, never spin
            raise ValueError(f"no question of kinds {mix.questions} in {skipped} scenes of presets {preset_names}")
        if not rows:
            continue
        examples = scene_examples(render_scene(scene), scene, rows, rng, mix, foreign)
        foreign = rows
        if mix.chat_turns == 1:
            yield from examples
            continue
        examples = list(examples)
        yield from (example for example in examples if example["format"] not in CHAT_FORMATS)
        yield from chat_examples([e for e in examples if e["format"] in CHAT_FORMATS], mix.chat_turns)
