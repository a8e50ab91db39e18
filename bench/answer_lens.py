"""In which decoder layer does a model's colour answer form? The logit lens at the answer position, layer by layer.

    python bench/answer_lens.py DIR [DIR …] [--preset simple] [--n 160]

For held-out colour questions about scenes of two or more objects (world seed 777, never a training seed), the
hidden state of the position that predicts the answer's first token is read after each decoder layer through
the final norm and the tied embeddings of the eight colour words (the last layer's state is the model's own
output). Per layer: how often that read already names the model's final answer, and how often it names the right
colour. A model whose answer is fixed after layer 0 reads the image before the question can steer it: at layer 0
the answer position's query is its own token alone, so it attends to whichever object is salient.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from foveate.rl.answer_probe import MODEL_INPUTS, probe_parser
from foveate.rl.attention_supervision import answer_query_positions
from foveate.rl.sft import ChatCollator
from foveate.rl.sft_data import DataMix, example_stream
from foveate.rl.vision_aux import COLOR_CLASSES, word_ids


def lens_by_layer(model_dir: str, preset: str, n: int, seed: int) -> tuple[list[float], list[float], int]:
    """(share naming the final answer, share naming the right colour) per hidden state, and the question count."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir)
    collator = ChatCollator(processor, 512)
    colors = COLOR_CLASSES[1:]
    color_words = model.get_input_embeddings().weight.detach()[word_ids(processor.tokenizer, colors)]
    norm = model.model.language_model.norm
    mix = DataMix(formats={"qa": 1.0}, presets={preset: 1.0}, questions=("attribute/color",))
    stream = (e for e in example_stream(seed, mix) if len(e["scene"].objects) >= 2)
    examples = list(itertools.islice(stream, n))
    agree: list[float] = []
    right: list[float] = []
    for start in range(0, len(examples), 16):
        chunk = examples[start : start + 16]
        batch = collator(chunk)
        query = answer_query_positions(batch["labels"])
        with torch.no_grad():
            states = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, output_hidden_states=True).hidden_states
        rows = torch.arange(len(chunk))
        # hidden_states[-1] is already normed (it is what the LM head reads); the others get the final norm.
        reads = [((s[rows, query] if i == len(states) - 1 else norm(s[rows, query])) @ color_words.T).argmax(-1)
                 for i, s in enumerate(states)]  # fmt: skip
        truth = torch.tensor([colors.index(e["messages"][1]["content"]) for e in chunk])
        agree = agree or [0.0] * len(reads)
        right = right or [0.0] * len(reads)
        for layer, read in enumerate(reads):
            agree[layer] += float((read == reads[-1]).sum())
            right[layer] += float((read == truth).sum())
    return [a / len(examples) for a in agree], [r / len(examples) for r in right], len(examples)


def main() -> None:
    args = probe_parser(__doc__.split("\n\n")[0], 160, "colour questions about 2+ objects").parse_args()
    torch.set_num_threads(2)
    table = Table(title=f"logit lens at the answer position, colour questions on 2+ objects ({args.preset})")
    table.add_column("model", no_wrap=True)
    table.add_column("read", justify="right")
    for directory in args.models:
        agree, right, n = lens_by_layer(directory, args.preset, args.n, args.seed)
        if len(table.columns) == 2:
            for layer in range(len(agree)):
                table.add_column("input" if layer == 0 else f"after layer {layer - 1}", justify="right")
        name = "/".join(Path(directory).parts[-2:])
        table.add_row(f"{name} (n={n})", "= final answer", *(f"{a:.2f}" for a in agree))
        table.add_row("", "= right colour", *(f"{r:.2f}" for r in right))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
