"""White-box VLM backend on Hugging Face transformers (any chat VLM that the Auto classes load).

Loads `AutoModelForImageTextToText` + the model's processor from a local directory or a cached Hub id
(Qwen2-VL and Qwen2.5-VL tested through the project's tiny builder). Independent conversations are generated as
one left-padded batch. Besides `chat`, it answers the white-box questions strategies ask: log-likelihood of a
given answer, the attention of the last prompt token to each image's tokens at chosen layers (captured under
SDPA by `attention_capture`, never via `output_attentions`), and the gradient of an answer's log-likelihood
with respect to the input pixels, mapped back onto the image.

Latency reported per conversation is the wall time of the batch it was generated in.

Box convention (how the model writes boxes, see ``policies.base.BOX_CONVENTIONS``): the ``box_convention``
argument if given, else ``{"box_convention": ...}`` from a ``foveate_model.json`` in the model directory, else
by ``config.model_type`` (`MODEL_BOX_CONVENTIONS`: Qwen2-VL and Qwen3-VL write 0-1000, Qwen2.5-VL absolute
pixels of its resized input), else ``"thousand"``. `TransformersVLM.resized_size` gives the resized input
geometry the ``"resized"`` convention needs.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from foveate.errors import ContextLengthError, ModelLoadError, PolicyError
from foveate.policies import attention_capture
from foveate.policies.base import (
    DEFAULT_INPUT_SIDE,
    ChatResult,
    Completion,
    Conversation,
    ImageMap,
    SamplingParams,
    WhiteBoxPolicy,
    check_box_convention,
    resolve_images,
    smart_resize,
)
from foveate.policies.loading import load_processor, resolve_model_path
from foveate.policies.look_first import AnswerStartsMixin
from foveate.policies.reply_probe import ReplyProbeMixin
from foveate.policies.whitebox import WhiteBoxMixin

try:  # the PIL-backend Qwen2-VL image processor, whose resize `TransformersVLM.presize` reproduces
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError:  # older transformers: no such processor, images reach the processor as they are
    Qwen2VLImageProcessorPil = None

_CONTROL_TOKEN = re.compile(r"<\|[a-z_]+\|>")  # Qwen-style control tokens: <|im_start|>, <|image_pad|>, …

MIN_IMAGE_SIDE = 28  # one merged Qwen2-VL cell; smaller images are upscaled so the processor accepts them
MAX_ASPECT = 150  # smart_resize refuses > 200; pad thinner images to this ratio
# config.model_type → how that family writes boxes; anything else reads "thousand" (override: foveate_model.json).
MODEL_BOX_CONVENTIONS = {"qwen2_vl": "thousand", "qwen2_5_vl": "resized", "qwen3_vl": "thousand"}
MODEL_METADATA = "foveate_model.json"  # optional file in a model directory: {"box_convention": "..."}


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else Apple MPS, else CPU — unless the caller names one."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bfloat16 on GPUs that support it, float32 elsewhere (CPU bf16 matmuls are slow and less exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def fitted_geometry(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """What `fit_for_model` does to an image of ``size``: ``(content_size, canvas_size)``.

    The image is scaled to ``content_size`` and pasted at the top-left corner of a ``canvas_size`` canvas (equal
    to ``content_size`` unless the aspect ratio needed padding).
    """
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        scale = MIN_IMAGE_SIDE / min(width, height)
        width, height = max(MIN_IMAGE_SIDE, round(width * scale)), max(MIN_IMAGE_SIDE, round(height * scale))
    canvas = (width, height)
    if max(width, height) / min(width, height) > MAX_ASPECT:
        side = max(width, height) // MAX_ASPECT + 1
        canvas = (max(width, side), max(height, side))
    return (width, height), canvas


def fit_for_model(image: Image.Image) -> Image.Image:
    """Upscale images below one cell and pad extreme aspect ratios so every valid image reaches the model."""
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        scale = MIN_IMAGE_SIDE / min(width, height)
        image = image.resize((max(MIN_IMAGE_SIDE, round(width * scale)), max(MIN_IMAGE_SIDE, round(height * scale))))
        width, height = image.size
    if max(width, height) / min(width, height) > MAX_ASPECT:
        side = max(width, height) // MAX_ASPECT + 1
        canvas = Image.new("RGB", (max(width, side), max(height, side)), "white")
        canvas.paste(image, (0, 0))
        image = canvas
    return image


def presizes_like(processor: Any) -> bool:
    """Whether `TransformersVLM.presize` gives ``processor``'s own pixels: a PIL-backend Qwen2-VL image processor
    (or a subclass keeping its resize: the ``smart_resize`` rule, one PIL resize) that resizes at all."""
    if Qwen2VLImageProcessorPil is None or not getattr(processor, "do_resize", False):
        return False
    return getattr(type(processor), "resize", None) is Qwen2VLImageProcessorPil.resize


class TransformersVLM(AnswerStartsMixin, ReplyProbeMixin, WhiteBoxMixin, WhiteBoxPolicy):
    """Chat and white-box access to a local transformers VLM (`WhiteBoxPolicy`)."""

    white_box = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_batch_size: int = 16,
        box_convention: str | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText

        self.model_path = resolve_model_path(model_path)
        self.name = Path(self.model_path).name if Path(self.model_path).exists() else self.model_path
        self.device = pick_device(device)
        self.max_batch_size = max_batch_size
        self.processor = load_processor(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_path,
                dtype=pick_dtype(self.device, dtype),
                attn_implementation=attention_capture.register(),
            ).to(self.device)
        except (OSError, ValueError, KeyError, SafetensorError) as error:  # SafetensorError: corrupt weights file
            raise ModelLoadError(f"cannot load model from {model_path}: {error}") from error
        self.model.eval()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(
            getattr(self.processor, "image_token", "<|image_pad|>")
        )
        self.merge_size = int(getattr(self.processor.image_processor, "merge_size", 2))
        self.patch_size = int(getattr(self.processor.image_processor, "patch_size", 14))
        self.size_override = self._size_override(min_pixels, max_pixels)
        self.end_token_ids = self._end_token_ids()
        self.box_convention = check_box_convention(box_convention or self._default_box_convention())

    def _default_box_convention(self) -> str:
        """``foveate_model.json``'s ``box_convention``, else the model family's (`MODEL_BOX_CONVENTIONS`)."""
        metadata = Path(self.model_path) / MODEL_METADATA
        if metadata.is_file():
            try:
                value = json.loads(metadata.read_text()).get("box_convention")
            except (OSError, ValueError, AttributeError) as error:
                raise ModelLoadError(f"cannot read {metadata}: {error}") from error
            if value:
                return str(value)
        return MODEL_BOX_CONVENTIONS.get(getattr(self.model.config, "model_type", ""), "thousand")

    # ---- the model's identity and input geometry (declared by WhiteBoxPolicy / ChatPolicy) -------------------
    @property
    def model_dir(self) -> Path | None:
        path = Path(self.model_path)
        return path if path.is_dir() else None

    def fingerprint(self) -> str:
        """The model path, the size and modification time of its weights and config, and the input resolution."""
        stamps = []
        for name in ("model.safetensors", "config.json"):
            file = Path(self.model_path) / name
            if file.is_file():
                stat = file.stat()
                stamps.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
        return f"{self.model_path}|{stamps}|{self.size_override}"

    @property
    def token_cell(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def input_side(self) -> int:
        """``sqrt(max_pixels)`` of the resolution override, else of the processor's ``size`` (Qwen2-VL's pixel
        budget ``longest_edge``: the demo model's 224 × 224 gives 224); `DEFAULT_INPUT_SIDE` when neither says.
        Checkpoints whose processor allows huge inputs (stock Qwen2-VL: 12.8 M pixels) should be run with
        ``max_pixels`` set to the budget actually evaluated, or every ViCrop window covers the whole image."""
        bounds = self.size_override or self.processor.image_processor.size
        read = bounds.get if isinstance(bounds, dict) else lambda key: getattr(bounds, key, None)
        max_pixels = read("longest_edge") or read("max_pixels")
        if isinstance(max_pixels, (int, float)) and max_pixels > 0:
            return int(math.isqrt(int(max_pixels)))
        return DEFAULT_INPUT_SIDE

    def resized_size(self, image_size: Sequence[int]) -> tuple[float, float]:
        """Where an image of ``image_size`` (width, height) lies in the model's resized input: its extent there.

        The input is the image after `fit_for_model` (upscaled if tiny, padded right/bottom if extremely thin)
        resized by the processor's ``smart_resize``; the original occupies the top-left ``(width, height)``
        returned here (floats; the whole resized input unless padding was needed). Boxes in the ``"resized"``
        convention divide by this to become fractions of the original image.
        """
        width, height = (int(v) for v in image_size)
        (content_w, content_h), (canvas_w, canvas_h) = fitted_geometry((width, height))
        resized_w, resized_h = self._processor_size((canvas_w, canvas_h))
        return content_w * resized_w / canvas_w, content_h * resized_h / canvas_h

    def _processor_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the processor resizes an image of ``size`` to (its ``smart_resize`` rule)."""
        bounds = self.size_override or self.processor.image_processor.size
        read = bounds.get if isinstance(bounds, dict) else lambda key: getattr(bounds, key, None)
        min_pixels = read("shortest_edge") or read("min_pixels") or 56 * 56
        max_pixels = read("longest_edge") or read("max_pixels") or 28 * 28 * 1280
        factor = self.patch_size * self.merge_size
        return smart_resize(*size, factor=factor, min_pixels=int(min_pixels), max_pixels=int(max_pixels))

    def presize(self, image: Image.Image) -> Image.Image:
        """``image`` shrunk with PIL to the size the processor would resize it to, when that is smaller.

        Why by hand: the PIL-backend Qwen2-VL processor turns the whole original into a numpy array and back
        into a PIL image before resizing it with the same filter, which costs more than the resize itself for
        large images; resizing first hands it an image already at its size (its own resize is then a copy). The
        pixels are the same (tests/test_presize.py). Processors with another resize (the torchvision backend,
        other model families) and non-RGB images (converted before the resize) get the image as it is.
        """
        if not (presizes_like(self.processor.image_processor) and image.mode == "RGB"):
            return image
        target = self._processor_size(image.size)
        if target[0] * target[1] >= image.size[0] * image.size[1]:
            return image
        return image.resize(target, self.processor.image_processor.resample)

    # ---- preparation ----------------------------------------------------------------------------------
    def _size_override(self, min_pixels: int | None, max_pixels: int | None) -> dict[str, int] | None:
        """Processor `size` for the requested resolution bounds (None keeps the checkpoint's own)."""
        if min_pixels is None and max_pixels is None:
            return None
        current = self.processor.image_processor.size
        shortest = min_pixels or getattr(current, "shortest_edge", None) or current["shortest_edge"]
        longest = max_pixels or getattr(current, "longest_edge", None) or current["longest_edge"]
        if shortest > longest:
            raise PolicyError(f"min_pixels {shortest} exceeds max_pixels {longest}")
        return {"shortest_edge": int(shortest), "longest_edge": int(longest)}

    def _end_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        generation_eos = self.model.generation_config.eos_token_id
        ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        return sorted(i for i in ids if i is not None)

    def render(self, messages: Conversation, *, add_generation_prompt: bool = True) -> tuple[str, list[Image.Image]]:
        """The chat-template text of one conversation and its (original, loaded) images in order."""
        resolved, images = resolve_images(messages)
        resolved = [self._defuse_control_tokens(message) for message in resolved]
        try:
            text = self.processor.apply_chat_template(
                resolved, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as error:  # jinja raises its own error types for malformed messages
            raise PolicyError(f"cannot render messages with the chat template: {error}") from error
        return text, images

    def _defuse_control_tokens(self, message: dict[str, Any]) -> dict[str, Any]:
        """Break ``<|…|>`` control tokens (``<|image_pad|>``, ``<|im_end|>``) written inside non-assistant text.

        A user who types ``<|image_pad|>`` would otherwise add an image slot the processor cannot fill (an
        error) or close their turn early (a prompt injection). A zero-width space after ``<`` keeps the text
        readable and tokenizes it as plain characters. Assistant turns are the model's own and pass unchanged.
        """
        if message.get("role") == "assistant":
            return message

        def defuse(text: str) -> str:
            return _CONTROL_TOKEN.sub(lambda match: "<\u200b" + match.group(0)[1:], text)

        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": defuse(content)}
        if isinstance(content, list):
            parts = [{**p, "text": defuse(p["text"])} if p.get("type") == "text" else p for p in content]
            return {**message, "content": parts}
        return message

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Tokenize a batch (left-padded) with its images, on the model's device."""
        kwargs: dict[str, Any] = {"text": list(texts), "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = [self.presize(fit_for_model(image)) for image in images]
            if self.size_override:
                kwargs["size"] = self.size_override
        try:
            batch = self.processor(**kwargs)
        except ValueError as error:
            raise PolicyError(f"the processor rejected the input: {error}") from error
        self.check_context(int(batch["attention_mask"].sum(dim=1).max()), 0)  # white-box passes read prompts too
        return {key: value.to(self.device) if hasattr(value, "to") else value for key, value in batch.items()}

    def render_all(self, conversations: Sequence[Conversation]) -> tuple[list[str], list[list[Image.Image]]]:
        """`render` of each conversation: the texts and each one's images."""
        rendered = [self.render(messages) for messages in conversations]
        return [text for text, _ in rendered], [images for _, images in rendered]

    def prepare(self, conversations: Sequence[Conversation]) -> tuple[dict[str, torch.Tensor], list[list[Image.Image]]]:
        texts, images_per_row = self.render_all(conversations)
        batch = self.encode(texts, [image for images in images_per_row for image in images])
        return batch, images_per_row

    # ---- chat -----------------------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Conversation], params: SamplingParams | None = None) -> list[ChatResult]:
        params = params or SamplingParams()
        results: list[ChatResult] = []
        for start in range(0, len(conversations), self.max_batch_size):
            results += self._chat_batch(conversations[start : start + self.max_batch_size], params)
        return results

    def _generation_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "num_return_sequences": params.n,
            "eos_token_id": self.end_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": not params.greedy,
        }
        if params.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    @torch.inference_mode()
    def _chat_batch(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[ChatResult]:
        started = time.perf_counter()
        batch, _ = self.prepare(conversations)
        self.check_context(int(batch["attention_mask"].sum(dim=1).max()), params.max_new_tokens)
        if params.seed is not None:
            torch.manual_seed(params.seed)  # generate() samples from the global generator
        output = self.model.generate(**batch, **self._generation_kwargs(params))
        latency = time.perf_counter() - started
        prompt_length = batch["input_ids"].shape[1]
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        generated = output[:, prompt_length:].tolist()
        results = []
        for row, _messages in enumerate(conversations):
            samples = generated[row * params.n : (row + 1) * params.n]
            completions = [self._completion(ids, params) for ids in samples]
            results.append(ChatResult(completions, int(prompt_tokens[row]), latency, self.name))
        return results

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a call whose longest prompt (tokens, image tokens included) plus ``max_new_tokens`` exceeds the
        model's ``max_position_embeddings``: past them a model answers garbage rather than failing."""
        config = self.model.config
        limit = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        if limit and prompt_tokens + max_new_tokens > limit:
            generated = f" and up to {max_new_tokens:,} may be generated" if max_new_tokens else ""
            raise ContextLengthError(
                f"the prompt is {prompt_tokens:,} tokens{generated}, more than the model's {limit:,} positions: "
                "shorten the question" + (" or ask for fewer tokens" if max_new_tokens else "")
            )

    def _completion(self, token_ids: list[int], params: SamplingParams) -> Completion:
        """Cut at the first end token; apply stop strings the way OpenAI does (excluded from the text)."""
        finish_reason = "length"
        for index, token in enumerate(token_ids):
            if token in self.end_token_ids:
                token_ids, finish_reason = token_ids[:index], "stop"
                break
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        for special in (self.tokenizer.pad_token, "<|im_end|>", "<|endoftext|>"):
            if special:
                text = text.replace(special, "")
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish_reason = text[:cut], "stop"
        return Completion(text=text, completion_tokens=len(token_ids), finish_reason=finish_reason)

    # ---- geometry shared with the white-box calls -----------------------------------------------------
    def image_spans(self, input_ids: torch.Tensor, grid_thw: torch.Tensor, images_per_row: Sequence[int]):
        """For each row, the (start, end) token positions and merged grid (rows, cols) of each of its images."""
        spans, image_index = [], 0
        for row, count in enumerate(images_per_row):
            positions = (input_ids[row] == self.image_token_id).nonzero().flatten().tolist()
            row_spans, cursor = [], 0
            for _ in range(count):
                t, h, w = (int(v) for v in grid_thw[image_index])
                rows, cols = h // self.merge_size, w // self.merge_size
                length = t * rows * cols
                row_spans.append((positions[cursor], positions[cursor + length - 1] + 1, (rows, cols)))
                cursor += length
                image_index += 1
            spans.append(row_spans)
        return spans

    def to_image_maps(self, values: np.ndarray, spans, images: Sequence[Image.Image], layer: Any) -> list[ImageMap]:
        """Split one row of per-token values into one grid-shaped map per image."""
        maps = []
        for (start, end, (rows, cols)), image in zip(spans, images, strict=True):
            grid = values[start:end].reshape(-1, rows, cols).mean(axis=0)
            maps.append(ImageMap(values=grid.astype(np.float32), image_size=image.size, kind="attention", layer=layer))
        return maps

    @property
    def num_layers(self) -> int:
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        return int(text_config.num_hidden_layers)
