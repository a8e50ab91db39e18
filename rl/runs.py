"""What every RL run shares: typed YAML configs, the run directory, per-step metrics, model and data loading.

A run directory (``--output-dir``) holds, besides TRL's ``checkpoint-N/`` folders and the final ``model/``:

- ``config.yaml``: the resolved config (YAML file plus command-line overrides) — rerun it with ``--config``;
- ``command.txt``: the command line; ``versions.json``: Python, torch, transformers, TRL, Ray, foveate, seed;
- ``metrics.jsonl``: one JSON object per logged step (`MetricsCallback`), what ``foveate plot RUN_DIR`` draws.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import TrainerCallback

import foveate
from foveate.errors import FoveateError

T = TypeVar("T")
DEFAULT_MODEL = str(Path(foveate.__file__).resolve().parent / "assets" / "models" / "demo")  # as foveate.api's
TRAIN_WORLD_SEED = 7  # training items' world seed: never the evaluator's held-out 1000
METRICS_FILE = "metrics.jsonl"


def help_field(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the dataclass metadata key HF also uses
    """A dataclass field with help text (``metadata["help"]``); mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class RunRecipe:
    """What every RL run shares: the model, its items, the run directory, logging and where it trains.

    `rl.deepeyes_grpo.GRPORecipe` and `rl.visrl_dpo.DPORecipe` add their method's fields; a subclass that
    redeclares a field (another default or help text) keeps its place in this order."""

    model: str | None = help_field(None, "model directory or cached Hub id to start from (None: the demo model)")
    data: str = help_field("world:small-detail", "training items: world:<preset> (training seed) or a tasks.jsonl")
    families: list = help_field([], "only task rows of these families (empty: all)")
    n_items: int = help_field(64, "training prompts drawn from --data")
    seed: int = help_field(0, "seed of sampling, shuffling and initialisation")
    output_dir: str = help_field("runs/run", "run directory: checkpoints, model/, metrics.jsonl, config")
    learning_rate: float = help_field(1e-5, "peak learning rate")
    beta: float = help_field(0.0, "KL / DPO coefficient")
    logging_steps: int = help_field(1, "log (and append to metrics.jsonl) every this many steps")
    save_steps: int = help_field(10, "write checkpoint-N every this many steps (and at the end)")
    bf16: bool = help_field(False, "bfloat16 training (GPU)")
    use_gpu: bool = help_field(False, "train on GPUs (Ray workers get one GPU each, nccl)")
    ray_workers: int = help_field(0, "Ray Train workers (0: train in this process)")
    ray_address: str | None = help_field(None, "an existing Ray cluster's address (None: a local one)")
    max_failures: int = help_field(1, "worker failures Ray restarts from the last checkpoint before giving up")

    def __post_init__(self) -> None:
        self.model = self.model or DEFAULT_MODEL


def config_help(cls: type) -> str:
    """Every field of a config dataclass with its default and help text, one per line."""
    return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata.get('help', '')}" for f in fields(cls))


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """A config dataclass from a YAML file (flat keys) plus overrides (None values are skipped).

    Unknown keys fail with the known ones listed, so a typo in a YAML file never silently trains a default.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise FoveateError(f"cannot read config {path}: {error}") from error
        if not isinstance(raw, dict):
            raise FoveateError(f"config {path}: expected a mapping of settings")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FoveateError(f"config {path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if hints[key] is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            raw[key] = float(value)  # YAML reads 1e-6 as a string
    try:
        return cls(**raw)
    except (TypeError, ValueError) as error:
        raise FoveateError(f"bad config {path}: {error}") from error


def versions() -> dict[str, str]:
    """Versions of what a run depends on (recorded in the run directory)."""
    import ray
    import torch
    import transformers
    import trl

    from foveate import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "ray": ray.__version__,
        "foveate": __version__,
        "platform": platform.platform(),
    }


def prepare_run_dir(output_dir: str | Path, config: Any, resume: bool) -> Path:
    """Create the run directory and write config.yaml, command.txt and versions.json.

    A directory that already holds checkpoints is refused unless ``resume`` (so a typo cannot overwrite a run).
    """
    out = Path(output_dir)
    has_checkpoints = any(out.glob("checkpoint-*")) or any(out.glob("stage*/checkpoint-*"))
    has_checkpoints = has_checkpoints or any((out / name).exists() for name in ("ray", "model", "preferences"))
    if has_checkpoints and not resume:
        raise FoveateError(f"{out} already holds a run; pass --resume to continue it or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    with open(out / "command.txt", "a", encoding="utf-8") as command:
        command.write(" ".join(sys.argv) + "\n")
    seed = getattr(config, "seed", None)
    (out / "versions.json").write_text(json.dumps({**versions(), "seed": seed}, indent=2) + "\n")
    return out


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, reward and its parts, tool-use rate, accuracy, lr, KL …) to ``metrics.jsonl``,
    one JSON object per logged step, from the main process only; ``prefix`` names the stage (DPO's two stages)."""

    def __init__(self, run_dir: str | Path, prefix: str = "") -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - TrainerCallback's signature
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **({"stage": self.prefix} if self.prefix else {})}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FoveateError(f"{run_dir}: no {METRICS_FILE} (not a training run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---- model, processor, data --------------------------------------------------------------------------------------
def save_processor_files(processor: Any, source_dir: str | Path, target: str | Path) -> None:
    """Save a processor as a model directory needs it: the tokenizer, plus the source's processor_config.json and
    chat_template.jinja copied (RESEARCH.md §7: the torchvision-free processor's own ``save_pretrained`` crashes),
    and foveate's notes on how the source model answers (``foveate_recipe.json``: look-first answers, read by
    `policies.look_first`; ``foveate_vicrop.json``: ViCrop's layer), which a fine-tuned model keeps."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(target)
    for name in (
        "processor_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        "video_preprocessor_config.json",
        "foveate_recipe.json",
        "foveate_vicrop.json",
    ):
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, target / name)


def load_model_and_processor(model_path: str, *, tool_calling: bool = False, dtype: str = "float32"):
    """The model (`AutoModelForImageTextToText`) and its processor through the torchvision-free loader.

    The processor's ``save_pretrained`` is replaced by `save_processor_files` (so Trainer checkpoints work without
    torchvision). ``tool_calling``: TRL's response parser for ``<think>`` / ``<tool_call>`` replies is set
    (``trl.chat_template_utils.qwen3_template``; TRL refuses the project's template without it).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor, resolve_model_path

    path = resolve_model_path(model_path)
    processor = load_processor(path)
    source = Path(path) if Path(path).is_dir() else None
    if source is not None:
        processor.save_pretrained = lambda target, **_: save_processor_files(processor, source, target)
    if tool_calling:
        from trl.chat_template_utils import qwen3_template

        processor.tokenizer.response_template = qwen3_template
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, processor


def load_rows(data: str, n: int, seed: int = TRAIN_WORLD_SEED, families: list[str] | None = None) -> list[dict]:
    """Task rows for training: ``world:<preset>`` (generated with the TRAINING seed, cached under
    ``$FOVEATE_HOME/tasks``) or a tasks.jsonl path; rows of ``families`` only when given; the first ``n``."""
    from foveate.eval.runner import resolve_tasks

    # Generate a few times more than needed when filtering by family, so n rows of the wanted kinds remain.
    tasks = resolve_tasks(data, n=n * (4 if families else 1), seed=seed if data.startswith("world:") else None)
    rows = [row for row in tasks.rows if not families or row.get("family") in families][:n]
    if not rows:
        raise FoveateError(f"{data}: no training rows{f' of families {families}' if families else ''}")
    return rows


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
