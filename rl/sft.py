"""Supervised fine-tuning of a VLM on world data — the recipe that builds the demo model.

    foveate train sft --config configs/demo.yaml    # rebuilds the demo model in $FOVEATE_HOME/models/demo-rebuild

A real library loop: transformers' `Trainer` over an endless, seeded `IterableDataset` of chats from
`rl.sft_data`, with a collator that renders each chat through the model's own chat template and processor and
trains on assistant tokens only (every `<|im_start|>assistant\\n … <|im_end|>` span; tool turns and prompts are
masked, as DeepEyes masks tool-returned tokens). It starts from a fresh tiny Qwen2-VL (`policies.tiny`) or,
with `init_from`, from an existing model directory.

Why `Trainer` and not TRL's `SFTTrainer`: the examples are generated on the fly with PIL images inside
multi-turn chats, and the only thing SFTTrainer would add here is its own collator, which needs a dataset with a
fixed schema; the masking rule is twelve lines below.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from foveate.errors import FoveateError
from foveate.policies.tiny import TinyConfig
from foveate.rl.sft_data import DataMix, example_stream

IGNORE = -100


@dataclass
class TrainConfig:
    """Optimisation settings (passed to transformers.TrainingArguments)."""

    max_steps: int = 3000  # optimiser steps
    batch_size: int = 16  # examples per step
    learning_rate: float = 5e-4  # peak learning rate (cosine decay after warm-up)
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    max_length: int = 512  # examples longer than this (tokens) are truncated
    seed: int = 0  # data-stream and initialisation seed
    logging_steps: int = 25  # how often to log the loss
    torch_threads: int = 2  # intra-op threads (the machine has 2 cores)
    dataloader_workers: int = 1  # processes rendering scenes while the main process trains
    max_minutes: float | None = None  # safety stop: end training (and save) after this wall time
    # End the stage after this many steps while the schedule still spans max_steps: a stage that a time limit
    # stopped is rebuilt step for step on any machine by recording where it stopped here.
    stop_after_steps: int | None = None
    vision_lr_scale: float = 1.0  # the vision tower's learning rate = learning_rate × this
    aux_weight: float = 0.0  # weight of the colour/shape loss on the vision tokens (rl.vision_aux); 0 = off
    aux_background_weight: float | None = None  # colour: None = mean over all cells; w = objects + w × background
    aux_shape: str = "object"  # shape labels: "object" (max over an object's cells), "cell" (v1 demo model) or "both"
    # Vision pretraining: train on the aux loss alone, skipping the language model (word-aligned heads still move
    # the embeddings of their answer words, which they score against).
    vision_only: bool = False
    # Aux heads that score classes against the decoder's embeddings of the answer words: "none", "all", "shape",
    # or "question" (all, scored against the question words too; rl.vision_aux).
    aux_word_aligned: str = "none"
    # Attention supervision (rl.attention_supervision): weight of −log(attention mass of the answer-predicting token
    # on the evidence cells of the scene image, heads averaged); 0 = off. attn_layers: the decoder layers supervised
    # (None = the middle one, the layer ViCrop reads by default).
    attn_weight: float = 0.0
    attn_layers: list[int] | None = None


# Settings of experiments that did not ship (their recipes are in git history, their findings in the model card),
# with the value that meant "off". A saved recipe (a model's foveate_recipe.json) lists them at these values and
# still loads; a recipe that turns one on is refused by name.
RETIRED = {
    "model": {"box_tokens": False},
    "data": {"box_step": None, "ground_look_first": False},
    "train": {
        "aux_label_crops": False,
        "aux_size": False,
        "aux_box": False,
        "aux_box_linear": False,
        "aux_box_only": False,
        "attn_heads": "mean",
        "attn_away_layers": [],
    },
}


@dataclass
class Stage:
    """One training stage: its data mix and optimisation (each stage starts from the previous one's model)."""

    data: DataMix = field(default_factory=DataMix)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SFTRecipe:
    """A whole SFT run: the model to start from, the data mix, the optimisation, and where to save."""

    # The final model directory (overwritten); None: `foveate train sft` picks $FOVEATE_HOME/models/<recipe>-rebuild.
    output_dir: str | None = None
    init_from: str | None = None  # start from this model directory instead of a fresh tiny model
    model: TinyConfig = field(default_factory=TinyConfig)  # size of a fresh tiny model
    data: DataMix = field(default_factory=DataMix)  # formats and presets of the example stream
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    save_dtype: str = "float16"  # weights are stored at this precision (the demo model ships in the repo)
    stages: list[Stage] = field(default_factory=list)  # several stages; empty = one stage of data/train above

    def all_stages(self) -> list[Stage]:
        return self.stages or [Stage(self.data, self.train)]


def load_recipe(path: str | Path) -> SFTRecipe:
    """Read a recipe YAML (sections model / data / train, as in configs/demo.yaml)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise FoveateError(f"cannot read recipe {path}: {error}") from error
    try:
        raw = {**raw, **{key: _current(key, raw.get(key) or {}) for key in RETIRED}}
        raw["stages"] = [{key: _current(key, stage.get(key) or {}) for key in stage} for stage in raw.get("stages", [])]
        # A stage's `data` / `train` keys override the top-level ones (so a stage lists only what changes).
        stages = [
            Stage(
                _data_mix({**raw.get("data", {}), **stage.get("data", {})}),
                TrainConfig(**{**raw.get("train", {}), **stage.get("train", {})}),
            )
            for stage in raw.get("stages", [])
        ]
        return SFTRecipe(
            output_dir=raw.get("output_dir", SFTRecipe.output_dir),
            init_from=raw.get("init_from"),
            model=TinyConfig(**raw.get("model", {})),
            data=_data_mix(raw.get("data", {})),
            train=TrainConfig(**raw.get("train", {})),
            save_dtype=raw.get("save_dtype", "float16"),
            stages=stages,
        )
    except (TypeError, ValueError) as error:
        raise FoveateError(f"bad recipe {path}: {error}") from error


def _current(section: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the retired keys of ``section`` that are off; a retired key that is on is an error."""
    retired = RETIRED.get(section, {})
    for key, value in settings.items():
        if key in retired and value != retired[key]:
            raise FoveateError(f"{section}.{key} was an experiment's setting and is no longer supported")
    return {key: value for key, value in settings.items() if key not in retired}


def _data_mix(data: dict[str, Any]) -> DataMix:
    data = dict(data)
    for key in ("crop_scale", "crop_min_side", "zoom_sizes", "questions", "scene_questions"):
        if data.get(key) is not None:  # null (as a run's foveate_recipe.json writes an unset one) stays None
            data[key] = tuple(data[key])
    return DataMix(**data)


class WorldChats(torch.utils.data.IterableDataset):
    """The endless example stream; each dataloader worker draws its own seeded sub-stream."""

    def __init__(self, seed: int, mix: DataMix) -> None:
        self.seed, self.mix = seed, mix

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        # World seeds of training streams stay far below the evaluator's held-out seed (1000): seed·16 + worker.
        yield from example_stream(self.seed * 16 + (worker.id if worker else 0), self.mix)


class ChatCollator:
    """Chats → padded model inputs with labels on assistant spans only."""

    def __init__(
        self,
        processor: Any,
        max_length: int,
        aux_targets: bool = False,
        attn_targets: bool = False,
    ) -> None:
        self.processor = processor
        self.attn_targets = attn_targets  # add rl.attention_supervision targets (evidence cells, query positions)
        self.aux_targets = aux_targets  # add rl.vision_aux per-cell targets for each example's scene image
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.start_id = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.assistant_ids = self.tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    def assistant_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        labels = torch.full_like(input_ids, IGNORE)
        header = len(self.assistant_ids)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            position = 0
            while position < len(ids):
                if ids[position] == self.start_id and ids[position + 1 : position + 1 + header] == self.assistant_ids:
                    start = position + 1 + header
                    end = ids.index(self.end_id, start) if self.end_id in ids[start:] else len(ids) - 1
                    labels[row, start : end + 1] = input_ids[row, start : end + 1]  # the answer and its <|im_end|>
                    position = end
                position += 1
        return labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images, scene_image_index = [], [], []
        for example in examples:
            texts.append(
                self.processor.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=False)
            )
            scene_image_index.append(len(images))  # every format's first image is the full scene
            for message in example["messages"]:
                content = message["content"]
                if not isinstance(content, str):
                    images += [part["image"] for part in content if part["type"] == "image"]
        self.tokenizer.padding_side = "right"  # training pads on the right; generation uses the left
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = self.assistant_labels(batch["input_ids"])
        batch["labels"][batch["attention_mask"] == 0] = IGNORE
        for row, example in enumerate(examples):
            if example.get("open_reply"):  # the reply is only a beginning (format copy): its end is not a target
                batch["labels"][row][batch["labels"][row] == self.end_id] = IGNORE
        if self.aux_targets and "image_grid_thw" in batch:
            from foveate.rl.vision_aux import batch_targets

            merge = self.processor.image_processor.merge_size
            batch |= batch_targets(examples, scene_image_index, batch["image_grid_thw"], merge)
        if batch["input_ids"].shape[1] > self.max_length:
            # Truncation keeps every image token (they come first in every format) and cuts answer text only.
            for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
                if key in batch:
                    batch[key] = batch[key][:, : self.max_length]
        if self.attn_targets and "image_grid_thw" in batch:
            from foveate.rl import attention_supervision

            image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            merge = self.processor.image_processor.merge_size
            batch |= attention_supervision.batch_targets(
                examples, scene_image_index, batch["input_ids"], batch["labels"], batch["image_grid_thw"],
                image_token_id, merge, tokenizer=self.tokenizer,
            )  # fmt: skip
        return batch


def aux_trainer_class():
    """`Trainer` that adds the auxiliary losses beside the language loss: `aux_weight` × the vision aux loss
    (rl.vision_aux, logged as `aux_loss`) and `attn_weight` × attention supervision (rl.attention_supervision,
    logged as `attn_loss`)."""
    from transformers import Trainer

    from foveate.policies.attention_capture import capture_attention
    from foveate.rl import attention_supervision
    from foveate.rl.vision_aux import TARGET_KEYS

    class AuxTrainer(Trainer):
        stage_train = TrainConfig()  # the stage's settings (aux_weight, aux_background_weight, vision_only, attn_*)
        _logged: tuple[tuple[str, float], ...] = ()  # (name, value) since the last log; rebound, never mutated

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = {key: inputs.pop(key) for key in TARGET_KEYS if key in inputs}
            attn_targets = {key: inputs.pop(key) for key in attention_supervision.TARGET_KEYS if key in inputs}
            train = self.stage_train
            if train.vision_only:  # the aux loss alone: only the vision tower runs ("vision pretraining")
                model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])  # feeds the aux hook
                result = (torch.zeros(()), None) if return_outputs else torch.zeros(())
            elif train.attn_weight and attn_targets:
                layers = train.attn_layers or [model.config.text_config.num_hidden_layers // 2]
                query = attn_targets["attn_query"].clamp_min(0)
                with capture_attention(layers, query_offset=query) as captured:
                    result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                attn = attention_supervision.loss({layer: captured.rows[layer] for layer in layers}, **attn_targets)
                self._logged = (*self._logged, ("attn_loss", attn.item()))
                result = (
                    (result[0] + train.attn_weight * attn, result[1])
                    if return_outputs
                    else result + train.attn_weight * attn
                )
            else:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if train.aux_weight:
                aux = model.foveate_aux.loss(**targets, background_weight=train.aux_background_weight)
                self._logged = (*self._logged, ("aux_loss", aux.item()))
                result = (
                    (result[0] + train.aux_weight * aux, result[1])
                    if return_outputs
                    else result + train.aux_weight * aux
                )
            return result

        def log(self, logs, *args, **kwargs):
            if self._logged and "loss" in logs:
                for name in dict(self._logged):
                    values = [value for key, value in self._logged if key == name]
                    logs[name] = round(sum(values) / len(values), 4)
                self._logged = ()
            super().log(logs, *args, **kwargs)

    return AuxTrainer


class EarlyStop:
    """A Trainer callback that ends training after `max_minutes` of wall time or `after_steps` steps."""

    def __new__(cls, max_minutes: float | None, after_steps: int | None):
        import time

        from transformers import TrainerCallback

        class _EarlyStop(TrainerCallback):
            def __init__(self) -> None:
                self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None

            def on_step_end(self, args, state, control, **kwargs):
                timed_out = self.deadline is not None and time.monotonic() > self.deadline
                if timed_out or (after_steps is not None and state.global_step >= after_steps):
                    control.should_training_stop = True
                return control

        return _EarlyStop()


def build_model(recipe: SFTRecipe, workdir: Path, init_from: str | Path | None = None):
    """A fresh tiny model (built into `workdir`) or the `init_from` model, with its processor."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor
    from foveate.policies.tiny import build_tiny_model

    init_from = init_from or recipe.init_from
    source = Path(init_from) if init_from else build_tiny_model(workdir / "init", recipe.model)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    return model, load_processor(source), source


def train_sft(recipe: SFTRecipe, workdir: str | Path | None = None, start_stage: int = 1) -> Path:
    """Run every stage of the recipe; the last stage's model is saved to output_dir.

    Intermediate stages are saved (at `save_dtype`, like the final model) under ``<output_dir>.work/stageN`` and
    reloaded by the next stage, so ``start_stage=N`` resumes from a finished stage N-1 with the same result.
    """
    if not recipe.output_dir:
        raise FoveateError("the recipe names no output_dir (foveate train sft --output-dir DIR)")
    output = Path(recipe.output_dir)
    workdir = Path(workdir or output.parent / (output.name + ".work"))
    stages = recipe.all_stages()
    if not 1 <= start_stage <= len(stages):
        raise FoveateError(f"start_stage must be in 1..{len(stages)}")
    for number, stage in enumerate(stages, 1):
        if stage.train.vision_only and not stage.train.aux_weight:
            raise FoveateError(f"stage {number}: vision_only trains on the aux loss alone, so it needs aux_weight > 0")
    source = workdir / f"stage{start_stage - 1}" if start_stage > 1 else None
    if source is not None and not (source / "config.json").exists():
        raise FoveateError(f"cannot start at stage {start_stage}: {source} holds no finished stage")
    for index in range(start_stage, len(stages) + 1):
        target = output if index == len(stages) else workdir / f"stage{index}"
        run_stage(recipe, stages[index - 1], target, workdir / f"stage{index}.work", init_from=source)
        source = target
    return output


def make_optimizer(model: Any, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the vision tower in its own group: a from-scratch vision encoder learns slower than the
    decoder finds language priors, so it may get a larger learning rate (`vision_lr_scale`)."""
    vision, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (vision if ".visual." in f".{name}" else rest).append(parameter)
    groups = [
        {"params": rest, "lr": train.learning_rate},
        {"params": vision, "lr": train.learning_rate * train.vision_lr_scale},
    ]
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay)


def run_stage(recipe: SFTRecipe, stage: Stage, output: Path, workdir: Path, init_from: Path | None) -> None:
    """One `Trainer` run over the stage's example stream; saves the model to `output`."""
    from transformers import Trainer, TrainingArguments, set_seed

    train = stage.train
    torch.set_num_threads(train.torch_threads)
    set_seed(train.seed)
    model, processor, source = build_model(recipe, workdir, init_from)
    if train.aux_weight:
        from foveate.rl import vision_aux

        vision_aux.attach(model, train.aux_shape, train.aux_word_aligned, processor.tokenizer)
    if train.attn_weight:  # the attention rows are captured by foveate's SDPA wrapper (logits unchanged)
        from foveate.policies import attention_capture

        model.set_attn_implementation(attention_capture.register())
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        dataloader_num_workers=train.dataloader_workers,
        remove_unused_columns=False,
        seed=train.seed,
        disable_tqdm=False,
        # accelerate's default for iterable datasets fetches a batch and slices every tensor along dim 0 to the
        # batch size, which would cut pixel_values (one row per image patch, not per example).
        accelerator_config={"dispatch_batches": False},
    )
    dataset = WorldChats(train.seed, stage.data)
    callbacks = [EarlyStop(train.max_minutes, train.stop_after_steps)]
    collator = ChatCollator(
        processor,
        train.max_length,
        aux_targets=bool(train.aux_weight),
        attn_targets=bool(train.attn_weight),
    )
    trainer_class = aux_trainer_class() if train.aux_weight or train.attn_weight else Trainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
        # With no vision multiplier, Trainer's own AdamW (no decay on biases and norms) is used unchanged.
        optimizers=(make_optimizer(model, train) if train.vision_lr_scale != 1.0 else None, None),
    )
    trainer.stage_train = train
    trainer.train()
    if train.aux_weight:
        vision_aux.detach(model)
    if train.attn_weight:
        model.set_attn_implementation("sdpa")  # saved models name the stock implementation
    save_model(model, source, output, recipe, trainer.state.log_history)


def save_model(model: Any, source: Path, output: Path, recipe: SFTRecipe, log_history: list[dict]) -> None:
    """Save weights at `save_dtype` next to the source's tokenizer/processor files and the recipe used."""
    output.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, recipe.save_dtype)).save_pretrained(output)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, output / name)
    (output / "foveate_recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=list) + "\n")
    losses = [{"step": e["step"], "loss": round(e["loss"], 4)} for e in log_history if "loss" in e]
    # The last entry is where the stage ended (a time limit may stop it before max_steps): see stop_after_steps.
    losses += [{"step": e["step"], "ended": True} for e in log_history[-1:] if "train_runtime" in e]
    (output / "training_log.json").write_text(json.dumps(losses, indent=1) + "\n")
