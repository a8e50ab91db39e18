"""Supervised fine-tuning with TRL's ``SFTTrainer`` on a JSON-lines file of conversational rows with images.

    foveate vpd distill --task world:large --n 200 --out sft.jsonl
    foveate train sft --data sft.jsonl --init-from foveate/assets/models/demo --output-dir out/vpd [--max-steps 200]

The project's first recipe on TRL's SFT (the demo model's own recipe, `rl.sft`, streams generated chats through
transformers' ``Trainer``). Rows are TRL's conversational formats: ``{"images": [path, ...], "prompt": [...],
"completion": [...]}`` (trained on the completion only, TRL's default for prompt-completion data) or
``{"images": [...], "messages": [...]}`` (trained on the whole chat), with ``{"type": "image"}`` placeholders;
image paths are loaded by ``datasets.Image``. Columns other than those are dropped before training. CPU-safe
settings: float32, no gradient checkpointing, no mixed precision. The output directory holds the weights plus the
tokenizer and processor files of ``init_from`` (the torchvision-free processor cannot ``save_pretrained``; see
RESEARCH.md §7), and ``training_log.json`` with the logged losses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foveate.errors import FoveateError

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json")


@dataclass
class TRLSFTSettings:
    """Optimisation settings passed to ``trl.SFTConfig``."""

    max_steps: int = 200  # optimiser steps
    batch_size: int = 4  # rows per step
    learning_rate: float = 1e-4  # peak learning rate (linear decay)
    seed: int = 0  # data order and initialisation of anything new
    logging_steps: int = 10  # how often the loss is logged


def load_rows(path: str | Path):
    """The rows as a `datasets.Dataset` with images loaded; a clear error for a missing or malformed file."""
    from datasets import Image, Sequence, load_dataset

    file = Path(path)
    if not file.is_file():
        raise FoveateError(f"SFT data not found: {file}")
    try:
        dataset = load_dataset("json", data_files=str(file), split="train")
    except Exception as error:  # noqa: BLE001 — datasets raises many types for a bad file
        raise FoveateError(f"cannot read SFT rows from {file}: {type(error).__name__}: {error}") from error
    columns = set(dataset.column_names)
    if not ({"prompt", "completion"} <= columns or "messages" in columns) or "images" not in columns:
        raise FoveateError(f"{file}: rows need 'images' and 'prompt'+'completion' or 'messages'; got {sorted(columns)}")
    keep = {"images", "prompt", "completion", "messages"}
    dataset = dataset.remove_columns(sorted(columns - keep))
    return dataset.cast_column("images", Sequence(Image()))


def train_trl_sft(
    data: str | Path, init_from: str | Path, output_dir: str | Path, settings: TRLSFTSettings | None = None
) -> Path:
    """Fine-tune ``init_from`` on the rows of ``data`` with TRL's SFTTrainer; the saved model's directory."""
    import torch
    from transformers import AutoModelForImageTextToText
    from trl import SFTConfig, SFTTrainer

    from foveate.policies.loading import load_processor

    settings = settings or TRLSFTSettings()
    source, output = Path(init_from), Path(output_dir)
    if not (source / "config.json").is_file():
        raise FoveateError(f"--init-from must be a model directory (no config.json in {source})")
    dataset = load_rows(data)
    torch.manual_seed(settings.seed)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(output / "checkpoints"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        logging_steps=max(1, min(settings.logging_steps, settings.max_steps)),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        max_length=None,  # truncating would cut image tokens out of the prompt
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=load_processor(source))
    trainer.train()
    _save(trainer.model, source, output, trainer.state.log_history)
    return output


def _save(model: Any, source: Path, output: Path, log_history: list[dict[str, Any]]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    for name in PROCESSOR_FILES:
        if (source / name).exists():
            shutil.copy(source / name, output / name)
    losses = [{"step": entry["step"], "loss": round(entry["loss"], 4)} for entry in log_history if "loss" in entry]
    (output / "training_log.json").write_text(json.dumps(losses, indent=1) + "\n")
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
