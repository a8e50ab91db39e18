"""Build a tiny Qwen2-VL model from a config, with the project's own tokenizer, processor and chat template.

No pretrained VLM can be downloaded here, so tests, benchmarks and the demo model start from this builder:
`foveate model init-tiny OUT_DIR` writes a directory that `AutoModelForImageTextToText` and `AutoProcessor`
(or `policies.loading.load_processor` where torchvision is missing) load like any Hub checkpoint.

Why each piece is built by hand:
- The tokenizer is a byte-level BPE trained with `tokenizers` on a small built-in corpus (the synthetic world's
  vocabulary, digits, JSON and the strategy tags), so the model's vocabulary is a few thousand ids instead of
  Qwen's 151k and any text still encodes (byte fallback).
- The processor is saved the full way, video processor config included, so the directory loads both where
  torchvision is installed and (through the loader's workaround) where it is not (RESEARCH.md §7).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Strategy tags are single tokens so the model emits them in one step and parsers never see them split.
TAG_TOKENS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

_CORPUS_WORDS = (
    "what which where how many is are there the a an of in on at to from left right above below top bottom "
    "middle center centre corner color colour shape size object objects image picture scene written label "
    "text number letter red green blue yellow purple orange cyan white black pink brown gray grey magenta "
    "circle square triangle star diamond hexagon cross pentagon heart ring rectangle tiny small medium large "
    "big bigger smaller larger same different yes no none answer question describe description locate box "
    "bbox focus zoom crop image_zoom_in_tool bbox_2d arguments name label true false count both neither and or "
    "than next near far closest farthest plain cluttered background foreground with without inside outside "
    "write a general description of the image answer with a single word or phrase explain the rationale"
)


@dataclass
class TinyConfig:
    """Size of the tiny model. Defaults: about 1.5 M parameters, a 5 MB safetensors file."""

    hidden_size: int = 128  # text decoder width
    num_layers: int = 2  # text decoder layers
    num_heads: int = 4  # text attention heads (head dim = hidden_size / num_heads)
    num_kv_heads: int = 2  # grouped-query key/value heads
    intermediate_size: int = 256  # text MLP width
    vision_depth: int = 2  # vision transformer blocks
    vision_embed_dim: int = 128  # vision transformer width
    vision_heads: int = 4  # vision attention heads
    vocab_size: int = 2048  # BPE merges stop here (special tokens included)
    min_pixels: int = 56 * 56  # processor lower bound on input pixels (resized image)
    max_pixels: int = 224 * 224  # processor upper bound: 224×224 → 64 image tokens after the 2×2 merge
    # Patches merged into one decoder token per side (Qwen2-VL: 2). 3 at 336 px keeps 64 tokens while the vision
    # tower sees 1.5× the pixels of 224 px.
    merge_size: int = 2
    # Train the tokenizer on each bare word too, so one-word answers are single tokens (False: the tokenizer of
    # the demo model v1, kept so its recipe, now in git history, still rebuilds it).
    bare_words: bool = True
    # Render a user turn's question before its images (the chat template's `question_first`). Image tokens then
    # see the question, so each can score its own object against the question's words before the answer token
    # looks; with the image first, only the answer position can do that matching. Measured, it does not help
    # binding: from one vision-pretrained stage 1, v6's stages 2-4 image-first vs question-first, the asked
    # object's share of answers naming some object's colour is 0.58 / 0.44 / 0.37 vs 0.59 / 0.43 / 0.39 on 2 / 3
    # / 4-object scenes (`bench/binding.py`, now in git history); question-first only names a scene colour more
    # often (0.04-0.07 of answers name none vs 0.19-0.31).
    question_first: bool = False
    seed: int = 0  # weight initialisation seed
    init_std: float = 0.02  # weight init std; tests use a larger one so random greedy outputs vary with the input


def corpus_lines(bare_words: bool = True) -> list[str]:
    """The text the tokenizer is trained on: world vocabulary, numbers, JSON boxes and strategy tags."""
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    # Each word alone too: answers follow "assistant\n" with no space before them, and a BPE that only saw
    # " star" splits a bare "star" into pieces ("st"+"ar"), which would make every one-word answer several
    # decisions, and "square"/"star" or "blue"/"brown"/"black" share their first token.
    lines += words if bare_words else []
    lines += [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1001, 50)]
    lines += [
        "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    ]
    lines += ['{"bbox_2d": [12, 340, 96, 401], "label": "red star"}', '{"name": "image_zoom_in_tool", "arguments": {}}']
    lines += [f"{tag} " for tag in TAG_TOKENS] + ["What color is the small star?", "How many circles are there?"]
    return lines * 4  # repetition makes frequent words single tokens


def chat_template(question_first: bool = False) -> str:
    """The project's chat template, with a user turn's text before its images when `question_first`."""
    template = TEMPLATE_PATH.read_text()
    if not question_first:
        return template
    flag = "{%- set question_first = false -%}"
    if flag not in template:  # an edited template that lost the switch would silently train image-first
        raise RuntimeError(f"{TEMPLATE_PATH} lost its question_first switch ({flag})")
    return template.replace(flag, "{%- set question_first = true -%}")


def build_tokenizer(vocab_size: int = 2048, bare_words: bool = True, question_first: bool = False):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(bare_words), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=8192,
        padding_side="left",
    )
    fast.add_tokens(TAG_TOKENS)
    fast.chat_template = chat_template(question_first)
    return fast


def build_processor(tokenizer, config: TinyConfig):
    """A Qwen2-VL processor around the PIL image processor (works without torchvision)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from foveate.policies.loading import processor_without_video

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}, merge_size=config.merge_size
    )
    return processor_without_video(Qwen2VLProcessor, image_processor, tokenizer, tokenizer.chat_template)


def build_model_config(tokenizer, config: TinyConfig):
    from transformers import Qwen2VLConfig

    head_dim = config.hidden_size // config.num_heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections; they must sum to it.
    quarter = head_dim // 8
    mrope_section = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "tie_word_embeddings": True,
        "initializer_range": config.init_std,
    }
    vision_config = {
        "depth": config.vision_depth,
        "embed_dim": config.vision_embed_dim,
        "hidden_size": config.hidden_size,
        "num_heads": config.vision_heads,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": config.merge_size,
        "temporal_patch_size": 2,
        "initializer_range": config.init_std,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
        initializer_range=config.init_std,
    )


def video_processor_config(config: TinyConfig) -> dict:
    """The video processor config a full save writes (mirrors the image processor's resolution)."""
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "size": {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": config.merge_size,
        "min_frames": 4,
        "max_frames": 768,
        "resample": 3,
    }


def save_processor(processor, out_dir: Path, config: TinyConfig) -> None:
    """Save tokenizer, chat template and a composite processor config that includes the video processor.

    `Qwen2VLVideoProcessor` cannot be instantiated without torchvision, yet a directory saved without its video
    processor fails to load where torchvision *is* installed ("Can't load video processor"). So the composite
    `processor_config.json` is written here with the video section a full save would contain.
    """
    processor.tokenizer._set_processor_class(type(processor).__name__)
    processor.tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(processor.chat_template)
    composite = processor.to_dict()
    composite["video_processor"] = video_processor_config(config)
    (out_dir / "processor_config.json").write_text(json.dumps(composite, indent=2, sort_keys=True) + "\n")


def build_tiny_model(out_dir: str | Path, config: TinyConfig | None = None, seed: int | None = None) -> Path:
    """Create a randomly initialised tiny Qwen2-VL directory (weights, tokenizer, processor, template)."""
    from transformers import Qwen2VLForConditionalGeneration

    config = config or TinyConfig()
    if seed is not None:
        config = TinyConfig(**{**asdict(config), "seed": seed})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(config.vocab_size, config.bare_words, config.question_first)
    processor = build_processor(tokenizer, config)
    torch.manual_seed(config.seed)
    model = Qwen2VLForConditionalGeneration(build_model_config(tokenizer, config))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    save_processor(processor, out, config)
    (out / "foveate_tiny.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out
