"""VisRL DPO: self-generated focus preferences, then TRL's `DPOTrainer` in two stages (RESEARCH.md §3).

    foveate train dpo --config configs/rl/visrl.yaml [--max-steps 3 --output-dir OUT] [--ray-workers 2]

Paper: "VisRL: Intention-Driven Visual Perception via Reinforced Reasoning". Steps:

1. **Sample** (`sample_attempts`): for each training item, ``samples`` attempts of the ``visrl`` strategy's
   procedure at a high temperature, batched through the policy (``policy.chat``): the focus box (step 1), the
   crop of the ORIGINAL image around it (``agents.visrl.focus_window``, the strategy's own rule), the answer given
   the crop (step 3). An attempt whose box is unusable answers from the full image (as the strategy falls back).
2. **Score**: answer accuracy by the task's exact answer rules (``eval.metrics.score_answer`` on the text after a
   look-first thought); box score by IoU (`box_score`): IoU of the crop window the stated box yields with the
   window the ground-truth evidence box yields (both through ``focus_window``). Comparing windows, not raw boxes,
   is the honest reading of "box relevance" here: the strategy crops a window of at least the model's input side,
   so a small box on the object gives about the crop the evidence box gives (score near 1), while a raw-box IoU
   against a 24-px object would call every useful window irrelevant.
3. **Select** (`select_pair`, pure): keep an item if max acc ≥ ``acc_high`` (0.8) and min acc ≤ ``acc_low`` (0.2);
   chosen = the best-acc attempt among those with a usable box and box score ≥ ``box_high`` (0.8), rejected = the
   worst-acc attempt among those with box score ≤ ``box_low`` (0.2; no box scores 0); ties go to the better
   (chosen) / worse (rejected) box score, then to the earlier attempt; no pair unless chosen acc > rejected acc.
4. **Train** (`train_worker`): DPO (sigmoid loss, β 0.1, a frozen reference copy that TRL makes). Stage 1 on the
   box step only (prompt: image + question; chosen / rejected: the two focus replies). Stage 2 from stage 1's model
   on box-step and answer-step pairs in equal parts (every kept item gives one of each, so the mean DPO loss over
   the shuffled union is 0.5·DPO(box) + 0.5·DPO(answer) in expectation). The answer-step prompt is the chosen
   attempt's conversation up to its crop (image, question, chosen box, crop, answer prompt); chosen / rejected are
   the two attempts' answers.

Deviations from the paper: IoU of windows replaces the judge's box score, exact match replaces its answer score;
the rejected answer was produced under the rejected attempt's crop but is scored as an alternative under the
chosen crop (VisRL's stage-2 answers pairs also share one prompt); boxes are in the policy's convention.
Preference data is written to ``<output_dir>/preferences/`` (JSONL + PNG) once, and reused on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from foveate.agents.oracle_crop import model_input_side
from foveate.agents.visrl import focus_window, parse_focus_box
from foveate.errors import BoxError, FoveateError
from foveate.eval.metrics import score_answer
from foveate.protocol import VISRL_ANSWER_PROMPT, VISRL_FOCUS_SUFFIX, strip_thought
from foveate.rl.runs import (
    TRAIN_WORLD_SEED,
    MetricsCallback,
    RunRecipe,
    help_field,
    load_model_and_processor,
    load_rows,
    prepare_run_dir,
)
from foveate.tools.boxes import Box
from foveate.tools.crop import crop

PAIRS_DIR = "preferences"


@dataclass
class DPORecipe(RunRecipe):
    """A VisRL DPO run (configs/rl/visrl.yaml). Every field has help text; CLI flags override."""

    families: list = help_field([], "only task rows of these families (empty: all with an evidence box)")
    n_items: int = help_field(64, "items to sample attempts for (pairs come from the kept ones)")
    samples: int = help_field(3, "attempts per item (VisRL: 3)")
    temperature: float = help_field(1.0, "sampling temperature of the attempts (high: they must differ)")
    max_new_tokens: int = help_field(48, "tokens per sampled step")
    acc_high: float = help_field(0.8, "keep an item only if its best attempt's accuracy is at least this")
    acc_low: float = help_field(0.2, "… and its worst attempt's accuracy is at most this")
    box_high: float = help_field(0.8, "chosen attempts need a box score at least this")
    box_low: float = help_field(0.2, "rejected attempts need a box score at most this")
    seed: int = help_field(0, "seed of sampling and training")
    output_dir: str = help_field("runs/visrl-dpo", "run directory: preferences, stage checkpoints, model/, metrics")
    stage1_steps: int = help_field(30, "DPO steps on the box step")
    stage2_steps: int = help_field(30, "DPO steps on box and answer steps in equal parts")
    max_steps: int | None = help_field(None, "if set, the step count of EACH stage (a quick run: --max-steps 3)")
    batch_size: int = help_field(2, "preference pairs per device per step")
    learning_rate: float = help_field(5e-6, "learning rate (VisRL on Qwen2.5-VL-7B: about 1e-6)")
    beta: float = help_field(0.1, "DPO beta (sigmoid loss)")
    max_length: int = help_field(1024, "tokens per prompt + reply")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2 (a pair needs two attempts), got {self.samples}")

    def stage_steps(self) -> tuple[int, int]:
        return (self.max_steps, self.max_steps) if self.max_steps else (self.stage1_steps, self.stage2_steps)


@dataclass
class Attempt:
    """One sampled attempt: the focus reply, its box (original pixels, None if unusable), the crop window, the
    answer reply, and the two scores."""

    focus_text: str
    box: list[float] | None
    window: list[float] | None
    answer_text: str
    box_score: float
    acc: float


# ---- scoring and selection (pure) -----------------------------------------------------------------------------
def box_score(window: Box | None, evidence: list[list[float]], image_size: tuple[int, int], input_side: int) -> float:
    """IoU of a crop window with the window the evidence (union of its boxes) yields; 0.0 for no window.

    >>> box_score(Box(0, 0, 100, 100), [[10, 10, 30, 30]], (400, 400), 100)
    1.0
    >>> box_score(Box(300, 300, 400, 400), [[10, 10, 30, 30]], (400, 400), 100)
    0.0
    """
    if window is None or not evidence:
        return 0.0
    union = Box(
        min(b[0] for b in evidence),
        min(b[1] for b in evidence),
        max(b[2] for b in evidence),
        max(b[3] for b in evidence),
    )
    return round(window.iou(focus_window(union, image_size, input_side)), 6)


def select_pair(
    attempts: list[Attempt],
    acc_high: float = 0.8,
    acc_low: float = 0.2,
    box_high: float = 0.8,
    box_low: float = 0.2,
) -> tuple[int, int] | None:
    """(chosen, rejected) attempt indices by VisRL's rules (module docstring), or None if the item is dropped.

    >>> def a(acc, box): return Attempt("", [0, 0, 9, 9], [0, 0, 9, 9], "", box, acc)
    >>> select_pair([a(1.0, 0.9), a(0.0, 0.1), a(0.0, 0.5)])
    (0, 1)
    >>> select_pair([a(1.0, 0.9), a(1.0, 0.1)]) is None   # no attempt is wrong: dropped
    True
    >>> select_pair([a(1.0, 0.5), a(0.0, 0.1)]) is None   # the right attempt's box is not good enough
    True
    """
    if not attempts:
        return None
    accs = [attempt.acc for attempt in attempts]
    if max(accs) < acc_high or min(accs) > acc_low:
        return None
    good = [i for i, attempt in enumerate(attempts) if attempt.box_score >= box_high and attempt.window is not None]
    bad = [i for i, attempt in enumerate(attempts) if attempt.box_score <= box_low]
    if not good or not bad:
        return None
    chosen = min(good, key=lambda i: (-attempts[i].acc, -attempts[i].box_score, i))
    rejected = min(bad, key=lambda i: (attempts[i].acc, attempts[i].box_score, i))
    if chosen == rejected or attempts[chosen].acc <= attempts[rejected].acc:
        return None
    return chosen, rejected


# ---- sampling -------------------------------------------------------------------------------------------------
def _focus_turn(image: Any, question: str, suffix: str = VISRL_FOCUS_SUFFIX) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question + suffix}]}


def _answer_conversation(image: Any, question: str, focus_text: str, window_image: Any) -> list[dict[str, Any]]:
    crop_turn = {
        "role": "user",
        "content": [{"type": "image", "image": window_image}, {"type": "text", "text": VISRL_ANSWER_PROMPT}],
    }
    return [_focus_turn(image, question), {"role": "assistant", "content": focus_text}, crop_turn]


def sample_attempts(policy: Any, items: list[tuple[Any, dict]], recipe: DPORecipe) -> list[list[Attempt]]:
    """``recipe.samples`` attempts per (image, row), each step batched over all items in one ``policy.chat``."""
    from foveate.agents.zoom_tool import without_vision_tokens
    from foveate.policies.base import SamplingParams

    side = model_input_side(policy)
    params = SamplingParams(
        max_new_tokens=recipe.max_new_tokens, temperature=recipe.temperature, n=recipe.samples, seed=recipe.seed
    )
    focus = policy.chat([[_focus_turn(image, row["question"])] for image, row in items], params)
    answer_conversations, drafts = [], []
    for (image, row), result in zip(items, focus, strict=True):
        for completion in result.completions:
            text = without_vision_tokens(completion.text).strip()
            try:
                box = parse_focus_box(text, image.size, policy)
            except BoxError:
                box = None
            if box is None:  # the strategy's fallback: the plain question on the full image
                conversation = [_focus_turn(image, row["question"], suffix="")]
                window = None
            else:
                window = focus_window(box, image.size, side)
                conversation = _answer_conversation(image, row["question"], text, crop(image, window)[0])
            answer_conversations.append(conversation)
            drafts.append((row, image, text, box, window))
    single = SamplingParams(max_new_tokens=recipe.max_new_tokens, temperature=recipe.temperature, seed=recipe.seed + 1)
    answers = policy.chat(answer_conversations, single)
    attempts: list[list[Attempt]] = [[] for _ in items]
    for index, ((row, image, text, box, window), result) in enumerate(zip(drafts, answers, strict=True)):
        answer = without_vision_tokens(result.text).strip()
        acc = float(score_answer(strip_thought(answer), row, image.size, policy.box_convention)["score"])
        score = box_score(window, row.get("boxes") or [], image.size, side)
        attempts[index // recipe.samples].append(
            Attempt(text, box.to_list() if box else None, window.to_list() if window else None, answer, score, acc)
        )
    return attempts


def build_preferences(recipe: DPORecipe, out: Path) -> Path:
    """Sample, score and select; write ``preferences/pairs.jsonl`` (+ PNGs) and ``attempts.jsonl``; return the
    pairs file. An existing complete file is reused (resume)."""
    from foveate.policies.transformers_vlm import TransformersVLM
    from foveate.tools.images import load_image

    folder = out / PAIRS_DIR
    pairs_file = folder / "pairs.jsonl"
    if pairs_file.is_file():
        return pairs_file
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        row
        for row in load_rows(recipe.data, recipe.n_items * 2, TRAIN_WORLD_SEED, recipe.families or None)
        if row.get("boxes")
    ]
    items = [(load_image(row["image"]), row) for row in rows[: recipe.n_items]]
    policy = TransformersVLM(recipe.model)
    try:
        all_attempts = sample_attempts(policy, items, recipe)
    finally:
        policy.close()
    records, log = [], []
    for (image, row), attempts in zip(items, all_attempts, strict=True):
        pair = select_pair(attempts, recipe.acc_high, recipe.acc_low, recipe.box_high, recipe.box_low)
        log.append({"id": row["id"], "pair": pair, "attempts": [asdict(a) for a in attempts]})
        if pair is None:
            continue
        chosen, rejected = attempts[pair[0]], attempts[pair[1]]
        image_path = folder / f"{len(records):05d}-image.png"
        crop_path = folder / f"{len(records):05d}-crop.png"
        image.save(image_path)
        crop(image, Box(*chosen.window))[0].save(crop_path)
        records.append({"id": row["id"], "question": row["question"], "image": image_path.name, "crop": crop_path.name,
                        "chosen": asdict(chosen), "rejected": asdict(rejected)})  # fmt: skip
    (folder / "attempts.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))
    summary = {"items": len(items), "pairs": len(records), "samples": recipe.samples}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not records:
        raise FoveateError(
            f"no preference pairs from {len(items)} items ({recipe.samples} attempts each): no item had both a right "
            "attempt with a good box and a wrong one with a bad box; raise samples/n_items or the temperature"
        )
    tmp = pairs_file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, pairs_file)  # written last: its presence means the preferences are complete
    return pairs_file


def _say(text: str) -> list[dict[str, Any]]:
    """One assistant message whose content is a list of parts (Arrow needs every message's content one type)."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def dpo_rows(pairs_file: Path, stage: int) -> list[dict[str, Any]]:
    """DPO dataset rows of a stage: box-step pairs (stage 1), box- and answer-step pairs (stage 2)."""
    from PIL import Image

    rows = []
    for line in pairs_file.read_text().splitlines():
        record = json.loads(line)
        image = Image.open(pairs_file.parent / record["image"]).convert("RGB")
        chosen, rejected = record["chosen"], record["rejected"]
        focus_prompt = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": record["question"] + VISRL_FOCUS_SUFFIX}],
            }
        ]
        rows.append(
            {
                "images": [image],
                "prompt": focus_prompt,
                "chosen": _say(chosen["focus_text"]),
                "rejected": _say(rejected["focus_text"]),
            }
        )
        if stage == 2:
            window = Image.open(pairs_file.parent / record["crop"]).convert("RGB")
            crop_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VISRL_ANSWER_PROMPT}]}
            rows.append(
                {
                    "images": [image, window],
                    "prompt": [*focus_prompt, *_say(chosen["focus_text"]), crop_turn],
                    "chosen": _say(chosen["answer_text"]),
                    "rejected": _say(rejected["answer_text"]),
                }
            )
    return rows


# ---- training -------------------------------------------------------------------------------------------------
def dpo_args(recipe: DPORecipe, output_dir: str, steps: int, on_ray: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        beta=recipe.beta,
        loss_type=["sigmoid"],
        max_length=recipe.max_length,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        seed=recipe.seed,
        bf16=recipe.bf16,
        use_cpu=not recipe.use_gpu,
        report_to=[],
        ddp_find_unused_parameters=False if on_ray else None,
        dataloader_num_workers=0,
    )


def train_worker(config: dict[str, Any]) -> None:
    """Both stages in this process (on Ray: on every worker); a finished stage (its ``model/``) is skipped."""
    from datasets import Dataset
    from trl import DPOTrainer

    from foveate.rl.ray_train import RankZeroReport, resume_checkpoint, world_barrier

    config = dict(config)
    output_dir, on_ray, resume = config.pop("output_dir"), config.pop("on_ray", False), config.pop("resume", False)
    recipe = DPORecipe(**config)
    out = Path(output_dir)
    start = recipe.model
    for stage, steps in enumerate(recipe.stage_steps(), start=1):
        stage_dir = out / f"stage{stage}"
        if (stage_dir / "model" / "config.json").is_file():
            start = str(stage_dir / "model")
            continue
        model, processor = load_model_and_processor(start)
        trainer = DPOTrainer(
            model=model,
            args=dpo_args(recipe, str(stage_dir), steps, on_ray),
            train_dataset=Dataset.from_list(dpo_rows(out / PAIRS_DIR / "pairs.jsonl", stage)),
            processing_class=processor,
            callbacks=[
                MetricsCallback(out, prefix=f"stage{stage}"),
                *([RankZeroReport(f"stage{stage}")] if on_ray else []),
            ],
        )
        with resume_checkpoint(stage_dir, resume, on_ray, tag=f"stage{stage}") as checkpoint:
            trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.is_world_process_zero():
            trainer.save_model(str(stage_dir / "model"))
        world_barrier()
        start = str(stage_dir / "model")
    if not (out / "model").exists() and _rank() == 0:
        shutil.copytree(start, out / "model")  # the last stage's model is the run's


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def train(recipe: DPORecipe, resume: bool = False) -> Path:
    """Build the preferences, then run both DPO stages locally or on Ray Train; returns the run directory."""
    out = prepare_run_dir(recipe.output_dir, recipe, resume)
    build_preferences(recipe, out)
    from foveate.rl.ray_train import train_here_or_on_ray

    return train_here_or_on_ray(train_worker, recipe, out, resume, name="visrl-dpo")
