"""Load processors and models from a local directory or a cached Hub id, with or without torchvision.

transformers 5 builds Qwen2-VL/2.5-VL processors with a video processor, and the video processor needs
torchvision. On CPU-only machines whose torch wheel has no matching torchvision (RESEARCH.md §7), `AutoProcessor`
fails even though images never need it. `load_processor` tries the normal path first and only then rebuilds the
processor around the PIL image processor, with no video processor, so image chat works in both environments.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from foveate.errors import ModelLoadError


def _torchvision_missing(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return "torchvision" in text or "video processor" in text or "video_processor" in text


@cache
def _video_free_class(processor_class: type) -> type:
    """A subclass of `processor_class` that accepts `video_processor=None`.

    The stock constructor type-checks every attribute against classes that import torchvision; skipping the
    check for an absent video processor is the whole change. The subclass keeps the parent's name so a
    `save_pretrained` still records the real processor class.
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name == "video_processor":
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"check_argument_for_proper_class": check_argument_for_proper_class},
    )


def processor_without_video(processor_class: type, image_processor: Any, tokenizer: Any, chat_template: str | None):
    """Instantiate a multimodal processor with no video processor (image-only use)."""
    cls = _video_free_class(processor_class)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pil_image_processor_class(name: str) -> type:
    """The PIL-backed image processor for a saved image processor type (e.g. Qwen2VLImageProcessor)."""
    import transformers

    for candidate in (f"{name}Pil", name.replace("Fast", "") + "Pil", name.replace("Fast", "")):
        cls = getattr(transformers, candidate, None)
        if cls is not None:
            return cls
    raise ModelLoadError(f"no PIL image processor found for {name}; install torchvision to load this model")


def _load_processor_without_torchvision(model_path: str) -> Any:
    import transformers
    from transformers import AutoTokenizer

    local = Path(model_path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(model_path, local_files_only=True))
    processor_config = _read_json(local / "processor_config.json")
    # transformers 5 saves one composite processor_config.json; older checkpoints keep preprocessor_config.json.
    image_config = processor_config.get("image_processor") or _read_json(local / "preprocessor_config.json")
    processor_class_name = processor_config.get("processor_class") or image_config.get("processor_class")
    processor_class = getattr(transformers, processor_class_name or "", None)
    if processor_class is None:
        raise ModelLoadError(f"{model_path}: unknown processor class {processor_class_name!r}")
    image_processor_type = image_config.get("image_processor_type", "")
    image_kwargs = {k: v for k, v in image_config.items() if k not in ("image_processor_type", "processor_class")}
    image_processor = _pil_image_processor_class(image_processor_type)(**image_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(local)
    chat_template = processor_config.get("chat_template") or getattr(tokenizer, "chat_template", None)
    template_file = local / "chat_template.jinja"
    if chat_template is None and template_file.exists():
        chat_template = template_file.read_text()
    return processor_without_video(processor_class, image_processor, tokenizer, chat_template)


def load_processor(model_path: str | Path) -> Any:
    """`AutoProcessor.from_pretrained`, falling back to an image-only processor when torchvision is missing."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(model_path))
    except Exception as error:  # transformers raises many types here; only torchvision-related ones are retried
        if not _torchvision_missing(error):
            raise ModelLoadError(f"cannot load processor from {model_path}: {error}") from error
    try:
        return _load_processor_without_torchvision(str(model_path))
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot load processor from {model_path} without torchvision: {error}") from error


def resolve_model_path(model: str | Path) -> str:
    """Check a model argument early so a typo gives one clear line instead of a Hub lookup traceback."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{model}: not a model directory (no config.json)")
        return str(path)
    if str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ModelLoadError(f"model directory not found: {model}")
    # A Hub id is accepted when it is already in the local Hugging Face cache: a typo must fail at once, not
    # after minutes of download retries (and offline machines cannot download anyway).
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(str(model), "config.json"), str):
        raise ModelLoadError(f"model not found: {model} is neither a directory nor a Hub id in the local cache")
    return str(model)
