"""Attention supervision: the token that predicts the answer should look at the evidence.

Measured on the demo models (`python bench/binding.py DIR`): the decoder copies an object's colour from the
image almost perfectly when the scene holds one object, and names a colour of the scene for most questions about
2-4 objects, but which object it reads is nearly chance: of the answers that name some object's colour, 0.58 /
0.44 / 0.37 name the asked one on scenes of 2 / 3 / 4 objects (chance 0.50 / 0.33 / 0.25). Matching the
question's description to the right image tokens is what the language loss alone does not teach a from-scratch
model in a few hundred steps: its gradient reaches the query-key match only through whichever object happened to
be read.

This loss gives that match a direct signal. At chosen decoder layers, the attention row of the last prompt token
(the position whose output is the answer's first token) is captured under SDPA (`policies.attention_capture`, a
[heads, keys] row, not `output_attentions`), restricted to the scene image's tokens and renormalised there; the
loss is −log of the attention mass, averaged over heads, on the cells the question's evidence boxes cover.
Renormalising over the scene leaves each head free to split its attention between text and image as the
language loss needs; averaging over heads before the log lets some heads attend elsewhere.

It is the attention supervision of Qiao et al. (2018, "Exploring Human-like Attention Supervision in Visual
Question Answering") and of grounded VQA work that followed, applied to a decoder VLM's own attention; "MLLMs
Know where to look" (ViCrop) is why the place matters twice here: ViCrop crops where this same row points.

Deviations: the evidence is the world's exact boxes, not human attention maps; a cell is evidence when a box
covers at least `min_cover` of it or holds the box's centre (so a tiny object still has its one cell); only the
first assistant turn of an example is supervised (every turn of a multi-turn chat of one scene's questions,
`rl.sft_data.chat_examples`, each at its own answer), and only on its first image (the scene; a crop's tokens
are left out of the renormalisation).

Measured (from configs/probes/demo-v6.yaml's stage-3 model, its stage-4 data for 600 steps, weight 1): the
attention moves and the answers do not. ViCrop's rel-att map on held-out `simple` scenes puts 0.35 of its mass on
the evidence at a supervised layer against 0.12 without (`foveate vicrop calibrate --no-record --model DIR
--task world:simple --n 60`), yet the asked object's share of answers naming some object's colour stays 0.58 /
0.45 / 0.37 on 2 / 3 / 4 objects, for layer 1, layers 1-2, head mean or (an option since removed) every head
(`python bench/binding.py DIR --n 1200`). Two reasons, both measured: the answer is mostly formed in layer 0 (its
logit-lens read at the answer position already names the final answer for 0.63 of these questions, `python
bench/answer_lens.py DIR`), before the query can know the question; and on held-out scenes every supervised
head's share on the evidence is only 0.39 (0.55-0.6 during training), so the supervised layers still read a
mixture of objects.
Pushing layer 0 off the image (an `away` loss, tried and removed) moved where the answer forms but neither bound
nor kept one-object copying: the asked object's share stayed 0.59 / 0.44 / 0.35 and one-object colour fell to 0.32.

Look-first models (`protocol.look_answer`) predict the answer inside their thought, at the referent's last word,
and that is where `query_positions` supervises them. Measured (configs/probes/demo-v10-attn.yaml: layer 0 there,
weight 1, v10's stage 4 for 676 steps, against the same stage without it): which object a colour answer names
is the asked one for 0.82 / 0.69 / 0.67 of answers on 2 / 3 / 4 objects (0.71 / 0.59 / 0.48 without), the first
binding gain this loss has given (`python bench/binding.py DIR --n 600`). Shape answers do not gain (0.58 / 0.40 /
0.39 against 0.66 / 0.39 / 0.51), although their layer-0 lookup moves onto the asked object (0.64 of the
attention against 0.04, `python bench/lookup_attention.py DIR`).

The `bench/…` diagnostics and `configs/probes/…` recipes cited here measured the demo model while it was built;
they left the tree with the rest of the lab notebook (`git log --diff-filter=D --stat -- bench/ configs/probes/`
lists them; the model card, foveate/assets/models/demo/README.md, sums up what they found).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from foveate import protocol

TARGET_KEYS = ("attn_query", "attn_scene", "attn_evidence")  # what `batch_targets` adds to a batch


def evidence_cells(
    boxes: list[list[float]], image_size: tuple[int, int], grid_h: int, grid_w: int, min_cover: float = 0.1
) -> np.ndarray:
    """[grid_h · grid_w] bool in raster order: the cells the boxes cover by at least `min_cover`, and each box's
    centre cell. Boxes are (x1, y1, x2, y2) pixels of an image of ``image_size`` (width, height)."""
    width, height = image_size
    rows = np.linspace(0, height, grid_h + 1)
    cols = np.linspace(0, width, grid_w + 1)
    cells = np.zeros((grid_h, grid_w), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        overlap_h = np.clip(np.minimum(rows[1:], y2) - np.maximum(rows[:-1], y1), 0, None) / np.diff(rows)
        overlap_w = np.clip(np.minimum(cols[1:], x2) - np.maximum(cols[:-1], x1), 0, None) / np.diff(cols)
        cells |= np.outer(overlap_h, overlap_w) >= min_cover
        centre_row = min(int((y1 + y2) / 2 / height * grid_h), grid_h - 1)
        centre_col = min(int((x1 + x2) / 2 / width * grid_w), grid_w - 1)
        cells[centre_row, centre_col] = True
    return cells.ravel()


def answer_query_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position just before its first labelled token (the one that predicts it); -1 if none."""
    labelled = labels != -100
    first = labelled.int().argmax(dim=1)
    return torch.where(labelled.any(dim=1), first - 1, torch.full_like(first, -1))


def look_answer_position(labels_row: torch.Tensor, thought_close_id: int, answer_length: int) -> int:
    """In a look-first answer (``<think>the red circle</think>circle``, `protocol.look_answer`), the position
    whose output is the answer's first token INSIDE the thought (the referent's last word); -1 without a thought.
    ``answer_length``: the answer's token count (as tokenised after a space)."""
    labelled = (labels_row != -100).nonzero()[:, 0]
    closes = (labels_row[labelled] == thought_close_id).nonzero()[:, 0]
    if not len(closes) or int(closes[0]) < answer_length:
        return -1
    return int(labelled[int(closes[0]) - answer_length]) - 1


def labelled_spans(labels_row: torch.Tensor) -> list[tuple[int, int]]:
    """The (start, end) positions, end exclusive, of each run of labelled tokens: one per assistant turn."""
    labelled = (labels_row != -100).int()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), labelled, torch.zeros(1, dtype=torch.int)]))
    return list(zip((edges == 1).nonzero()[:, 0].tolist(), (edges == -1).nonzero()[:, 0].tolist(), strict=True))


def supervised_turns(example: dict[str, Any]) -> list[tuple[int, str | None, list | None]]:
    """(assistant turn index, its reply if a look-first thought may hold the answer, evidence boxes) per turn the
    loss supervises: every turn of a chat (`rl.sft_data.chat_examples`, ``turn_evidence``); otherwise the first
    turn, with the example's evidence (a look-first reply only when it is the example's single reply)."""
    replies = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
    if "turn_evidence" in example:
        pairs = zip(replies, example["turn_evidence"], strict=True)
        return [(turn, reply, boxes) for turn, (reply, boxes) in enumerate(pairs)]
    return [(0, replies[0] if len(replies) == 1 else None, example.get("evidence"))]


def query_positions(examples: list[dict[str, Any]], labels: torch.Tensor, tokenizer: Any = None) -> torch.Tensor:
    """[batch, turns]: per row and supervised turn (`supervised_turns`), the position that predicts the turn's
    answer: just before its first labelled token, or, with a ``tokenizer``, inside a look-first thought
    (`look_answer_position`), where the demo models look the answer up: the layer-0 attention there puts 0.48 of
    its image mass on the asked object when the answer is right and 0.12 when it is wrong (2-3-object attribute
    questions, configs/probes/demo-v10.yaml's stage 4). -1 where a row has fewer turns (or they were cut off)."""
    turns = [supervised_turns(example) for example in examples]
    query = torch.full((len(examples), max(len(t) for t in turns)), -1, dtype=torch.long)
    close_id = tokenizer.convert_tokens_to_ids(protocol.THOUGHT_CLOSE) if tokenizer is not None else None
    for row, row_turns in enumerate(turns):
        spans = labelled_spans(labels[row])
        for slot, (turn, reply, _boxes) in enumerate(row_turns):
            if turn >= len(spans):
                continue
            start, end = spans[turn]
            query[row, slot] = start - 1
            parts = protocol.look_parts(reply) if tokenizer is not None and isinstance(reply, str) else None
            if parts is not None:
                thought, answer = parts
                span_labels = torch.full_like(labels[row], -100)
                span_labels[start:end] = labels[row, start:end]
                # A thought that does not restate its answer ("<think>the red star</think>{…}") is looked up at its
                # last word, just before "</think>".
                restated = thought.endswith(" " + answer)
                length = len(tokenizer(" " + answer, add_special_tokens=False).input_ids) if restated else 0
                query[row, slot] = look_answer_position(span_labels, close_id, length)
    return query


def batch_targets(
    examples: list[dict[str, Any]],
    scene_image_index: list[int],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    image_grid_thw: torch.Tensor,
    image_token_id: int,
    merge_size: int,
    tokenizer: Any = None,
) -> dict[str, torch.Tensor]:
    """The loss's targets for a collated batch.

    ``attn_query`` [batch, turns]: the positions whose attention is supervised (`query_positions`; a
    ``tokenizer`` moves them into look-first thoughts), -1 for turns without evidence (no boxes, such as a "no" to
    an existence question, or a describe example). ``attn_scene`` [batch, seq] bool: the token positions of the
    row's scene image; ``attn_evidence`` [batch, turns, seq] bool: those of each turn's evidence cells.
    """
    batch, length = input_ids.shape
    query = query_positions(examples, labels, tokenizer)
    scene = torch.zeros(batch, length, dtype=torch.bool)
    evidence = torch.zeros(batch, query.shape[1], length, dtype=torch.bool)
    grids = image_grid_thw.tolist()
    for row, (example, image) in enumerate(zip(examples, scene_image_index, strict=True)):
        scene_truth = example.get("scene")
        if scene_truth is None or image >= len(grids):
            query[row] = -1
            continue
        t, h, w = grids[image]
        grid_h, grid_w = h // merge_size, w // merge_size
        positions = (input_ids[row] == image_token_id).nonzero().squeeze(1)[: grid_h * grid_w]  # first image's
        cut = len(positions) < grid_h * grid_w  # the image was truncated
        for slot, (_turn, _reply, boxes) in enumerate(supervised_turns(example)):
            # No boxes, truncated, or the image not before the answer: not supervised.
            if not boxes or query[row, slot] < 0 or cut or positions[-1] >= query[row, slot]:
                query[row, slot] = -1
                continue
            cells = evidence_cells(boxes, (scene_truth.width, scene_truth.height), grid_h, grid_w)
            scene[row, positions] = True
            evidence[row, slot, positions[torch.from_numpy(cells)]] = True
    return {"attn_query": query, "attn_scene": scene, "attn_evidence": evidence}


def _per_query(
    row: torch.Tensor, attn_query: torch.Tensor, *masks: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The captured rows of the supervised queries, [queries, heads, keys], and each [batch, (turns,) seq] mask
    at those queries, [queries, keys]. Takes one query per row ([batch] / [batch, heads, keys]) or several."""
    query = attn_query if attn_query.dim() == 2 else attn_query[:, None]
    row = row if row.dim() == 4 else row.unsqueeze(2)  # [batch, heads, turns, keys]
    keep, keys = query >= 0, row.shape[-1]
    per_turn = [(m if m.dim() == 3 else m[:, None].expand(-1, query.shape[1], -1))[..., :keys] for m in masks]
    return row.transpose(1, 2)[keep], [m[keep] for m in per_turn]


def loss(
    rows: dict[int, torch.Tensor],
    attn_scene: torch.Tensor,
    attn_evidence: torch.Tensor,
    attn_query: torch.Tensor,
) -> torch.Tensor:
    """Mean over supervised queries and captured layers of −log(attention mass on the evidence, within the scene).
    ``rows``: layer → captured attention rows, [batch, heads, keys] (``attn_query`` [batch]) or [batch, heads,
    turns, keys] (``attn_query`` [batch, turns]). The log is of the head-mean mass, so some heads may look
    elsewhere."""
    if not (attn_query >= 0).any() or not rows:
        return torch.zeros(())
    losses = []
    for row in rows.values():
        kept, (scene, evidence) = _per_query(row, attn_query, attn_scene, attn_evidence)
        on_scene = (kept * scene[:, None]).sum(-1)
        share = (kept * evidence[:, None]).sum(-1) / on_scene.clamp_min(1e-12)  # [queries, heads]
        losses.append(-torch.log(share.mean(-1).clamp_min(1e-6)))
    return torch.stack(losses).mean()
