"""Do a model's vision tokens name each object's colour and shape word? A 20-second check of word-aligned towers.

    python bench/word_readout.py DIR [DIR ...] [--preset single] [--scenes 100] [--decoder]

For each object of held-out scenes (seed 999, never a training seed) the merged vision tokens it covers (at least
10 % of a cell) are averaged, and the colour (shape) word whose tied embedding has the highest cosine with that
mean is compared with the object's colour (shape; size, against the size words as questions write them, " tiny" …
" medium-sized", which `rl.vision_aux`'s size head scores). No head is fitted: this reads the tokens the way a
word-aligned aux head (`rl/vision_aux.py`, ``aligned="all"``) scores them, so it separates "the tower does not
carry the attribute in the answer word's direction" from "the decoder does not copy it" (compare with
`bench/first_token.py`). Chance is 1/8 for colour, 1/7 for shape and 1/4 for size. Needs one-token answer words
(`policies.tiny` tokenizers with bare words).

``--decoder`` follows the same objects into the decoder: the mean of their image tokens' hidden states at the
decoder's input and after each layer, read with the logit lens (the final norm, then the colour words' tied
embeddings). It asks whether an object's tokens still hold its own colour where the answer token reads them, or
whether attention among image tokens has mixed the scene's colours into them.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from rich.console import Console
from rich.table import Table

from foveate.rl.vision_aux import (
    COLOR_CLASSES,
    SHAPE_CLASSES,
    SIZE_QUESTION_WORDS,
    cell_coverage,
    question_word_ids,
    word_ids,
)
from foveate.world import iter_scenes, render_scene
from foveate.world.scenes import SIZE_CLASSES


def readout(model_dir: str, preset: str, n_scenes: int) -> tuple[float, float, float, int]:
    """(colour, shape, size accuracy, objects) of the nearest-word read of each object's mean vision token."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = load_processor(model_dir)
    colors, shapes = COLOR_CLASSES[1:], SHAPE_CLASSES  # COLOR_CLASSES[0] is "background"
    embedding = model.get_input_embeddings().weight.detach()

    def unit_words(names: tuple[str, ...]) -> torch.Tensor:
        return torch.nn.functional.normalize(embedding[word_ids(processor.tokenizer, names)], dim=-1)

    color_words, shape_words = unit_words(colors), unit_words(shapes)
    # Size words as questions write them (" medium-sized" is several tokens: their mean), as the size head scores.
    size_pieces = question_word_ids(processor.tokenizer, SIZE_QUESTION_WORDS[1:])
    size_words = torch.nn.functional.normalize(torch.stack([embedding[ids].mean(dim=0) for ids in size_pieces]), dim=-1)
    merged: dict[str, torch.Tensor] = {}
    model.model.visual.merger.register_forward_hook(lambda _m, _i, output: merged.__setitem__("tokens", output))
    merge = processor.image_processor.merge_size
    color_hits = shape_hits = size_hits = objects = 0
    for scene, _rows in itertools.islice(iter_scenes(999, preset), n_scenes):
        inputs = processor.image_processor(images=[render_scene(scene)], return_tensors="pt")
        _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
        coverage = cell_coverage(scene, grid_h // merge, grid_w // merge)
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        for number, obj in enumerate(scene.objects):
            cells = torch.from_numpy(coverage[number].ravel() >= 0.1)
            if not cells.any():  # too small to cover a tenth of any cell at input resolution
                continue
            mean_token = torch.nn.functional.normalize(merged["tokens"][cells].mean(dim=0), dim=-1)
            color_hits += colors[int((mean_token @ color_words.T).argmax())] == obj.color
            shape_hits += shapes[int((mean_token @ shape_words.T).argmax())] == obj.shape
            size_hits += SIZE_CLASSES[int((mean_token @ size_words.T).argmax())] == obj.size_class
            objects += 1
    return color_hits / max(objects, 1), shape_hits / max(objects, 1), size_hits / max(objects, 1), objects


def decoder_readout(model_dir: str, preset: str, n_scenes: int) -> list[tuple[float, int]]:
    """Per decoder layer (its input embeddings, then each layer's output): the colour accuracy of the logit lens
    (final norm, then the tied embedding of each colour word) on each object's mean image-token state."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir)
    colors = COLOR_CLASSES[1:]
    color_words = model.get_input_embeddings().weight.detach()[word_ids(processor.tokenizer, colors)]
    norm = model.model.language_model.norm
    merge = processor.image_processor.merge_size
    image_token = model.config.image_token_id
    hits: list[int] = []
    objects = 0
    for scene, rows in itertools.islice(iter_scenes(999, preset), n_scenes):
        chat = [{"role": "user", "content": [{"type": "image", "image": render_scene(scene)},
                                             {"type": "text", "text": rows[0]["question"]}]}]  # fmt: skip
        text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[chat[0]["content"][0]["image"]], return_tensors="pt")
        _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
        coverage = cell_coverage(scene, grid_h // merge, grid_w // merge)
        with torch.no_grad():
            states = model(**inputs, output_hidden_states=True).hidden_states
        positions = (inputs["input_ids"][0] == image_token).nonzero().squeeze(1)
        hits = hits or [0] * len(states)
        for number, obj in enumerate(scene.objects):
            cells = torch.from_numpy(coverage[number].ravel() >= 0.1)
            if not cells.any():
                continue
            objects += 1
            for layer, state in enumerate(states):
                scores = norm(state[0, positions[cells]].mean(dim=0)) @ color_words.T
                hits[layer] += colors[int(scores.argmax())] == obj.color
    return [(hit / max(objects, 1), objects) for hit in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories (tokenizers with one-token answer words)")
    parser.add_argument("--preset", default="single", help="world preset of the held-out scenes")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes per model")
    parser.add_argument("--decoder", action="store_true", help="also read the decoder's image-token states")
    args = parser.parse_args()
    table = Table(title=f"nearest answer word of each object's mean vision token ({args.preset}, seed 999)")
    for column in ("model", "colour", "shape", "size", "objects"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model_dir in args.models:
        color, shape, size, objects = readout(model_dir, args.preset, args.scenes)
        table.add_row(model_dir, f"{color:.2f}", f"{shape:.2f}", f"{size:.2f}", str(objects))
    Console().print(table)
    if args.decoder:
        decoder = Table(
            title=f"logit-lens colour of each object's mean image-token state, by decoder layer ({args.preset})"
        )
        decoder.add_column("model")
        for model_dir in args.models:
            per_layer = decoder_readout(model_dir, args.preset, args.scenes)
            if len(decoder.columns) == 1:
                for layer in range(len(per_layer)):
                    decoder.add_column("input" if layer == 0 else f"after layer {layer - 1}", justify="right")
            decoder.add_row(model_dir, *(f"{accuracy:.2f}" for accuracy, _ in per_layer))
        Console().print(decoder)


if __name__ == "__main__":
    main()
