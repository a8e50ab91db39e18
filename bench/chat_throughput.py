"""Supervised answers per second of SFT: one question per example against multi-turn chats of a scene's questions.

    python bench/chat_throughput.py           # ≈ 30 s; stage 4 of configs/demo.yaml (the demo model's recipe)
    python bench/chat_throughput.py --config configs/demo.yaml --stage 5

`rl.sft_data.DataMix.chat_turns` asks a scene's qa and ground questions in one chat, so one vision pass and one
scene image serve several answers. For the recipe stage's data mix as written (its chat settings) and the same mix
with one question per example (``chat_turns: 1``, the preset's questions per scene), on a fresh model of the
recipe's size, this prepares `--batches` batches of the stage's batch size and measures, per batch: the CPU
seconds of rendering and collating them (the dataloader worker, which shares the 2 cores with training), the
wall seconds of the forward + backward + AdamW step with the stage's losses (vision aux; attention supervision at
the stage's layers, every supervised turn), the answers supervised (assistant turns) and the answers whose
attention is supervised. The last columns divide answers by step + data seconds, and give that rate's ratio to the
single-question mix measured in the same run.

Measured on the 2-core machine (idle), batches of 16, seconds per batch (step / data CPU), answers per batch:
- stage 4 (1-4 objects; qa and ground): one question per example 0.77 / 0.37 s, 16.0 answers (15.0 with
  attention supervision), 14.0 answers/s; chats 0.98 / 0.35 s, 41.0 answers (38.6), 30.7 answers/s: 2.19×.
- stage 5 (`--stage 5`, the full mix; crop and tool formats stay one question per example): 1.06 / 0.48 s,
  17.8 answers, 11.5/s against 1.23 / 0.52 s, 26.2 answers, 14.9/s: 1.30×.
What the extra answers did to binding at equal wall time is in configs/probes/demo-v11.yaml: nothing measurable.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from timing import step_seconds, timed  # noqa: E402

from foveate.policies import attention_capture  # noqa: E402
from foveate.rl import attention_supervision, vision_aux  # noqa: E402
from foveate.rl.sft import ChatCollator, build_model, load_recipe  # noqa: E402
from foveate.rl.sft_data import DataMix, example_stream  # noqa: E402


def prepare(mix: DataMix, collator: ChatCollator, batch_size: int, batches: int, seed: int) -> tuple[list, list]:
    """(collated batches, CPU seconds to render and collate each)."""
    stream = example_stream(seed, mix)
    prepared, seconds = [], []
    for _ in range(batches):
        _, cpu, batch = timed(lambda: collator(list(itertools.islice(stream, batch_size))))
        prepared.append(batch)
        seconds.append(cpu)
    return prepared, seconds


def measure(recipe, stage, mixes: dict[str, DataMix], batches: int) -> dict[str, dict[str, float]]:
    train = stage.train
    model, processor, _ = build_model(recipe, Path("/tmp/foveate-chat-throughput"))
    if train.aux_weight:
        vision_aux.attach(model, train.aux_shape, train.aux_word_aligned, processor.tokenizer)
    model.set_attn_implementation(attention_capture.register())
    collator = ChatCollator(
        processor, train.max_length, aux_targets=bool(train.aux_weight), attn_targets=bool(train.attn_weight)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    results = {}
    for name, mix in mixes.items():
        prepared, data = prepare(mix, collator, train.batch_size, batches + 1, train.seed * 16)
        answers = [int(sum(len(s) for s in map(attention_supervision.labelled_spans, b["labels"]))) for b in prepared]
        attended = [int((b["attn_query"] >= 0).sum()) if "attn_query" in b else 0 for b in prepared]
        layers = train.attn_layers or [model.config.text_config.num_hidden_layers // 2]
        steps = [step_seconds(model, optimizer, dict(b), train.aux_weight, layers, train.attn_weight) for b in prepared]
        steps = steps[1:]  # the first warms up
        step, data_s = statistics.median(steps), statistics.median(data[1:])
        results[name] = {
            "step": step,
            "data": data_s,
            "answers": statistics.mean(answers[1:]),
            "attended": statistics.mean(attended[1:]),
            "rate": statistics.mean(answers[1:]) / (step + data_s),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).parents[1]
    parser.add_argument("--config", default=str(root / "configs" / "demo.yaml"), help="SFT recipe")
    parser.add_argument("--stage", type=int, default=4, help="1-based stage whose data mix and losses are used")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per mix")
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe(args.config)
    stage = recipe.all_stages()[args.stage - 1]
    torch.set_num_threads(stage.train.torch_threads)
    chats = stage.data
    if chats.chat_turns == 1:
        parser.error(f"stage {args.stage} of {args.config} asks one question per example; nothing to compare")
    single = replace(chats, chat_turns=1, scene_questions=None)
    mixes = {"one question per example": single, f"chats of ≤ {chats.chat_turns} turns": chats}
    results = measure(recipe, stage, mixes, args.batches)
    base = results["one question per example"]["rate"]
    table = Table(title=f"{Path(args.config).name} stage {args.stage}, batches of {stage.train.batch_size} examples")
    for column in ("mix", "step s", "data CPU s", "answers", "attention-supervised", "answers / s", "ratio"):
        table.add_column(column, justify="left" if column == "mix" else "right")
    for name, r in results.items():
        table.add_row(
            name, f"{r['step']:.2f}", f"{r['data']:.2f}", f"{r['answers']:.1f}", f"{r['attended']:.1f}",
            f"{r['rate']:.1f}", f"{r['rate'] / base:.2f}×",
        )  # fmt: skip
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
