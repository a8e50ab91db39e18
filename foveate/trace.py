"""Traces: the ordered, typed steps a strategy took, exportable to JSON and to a self-contained HTML page.

Steps are plain dicts with a ``kind`` discriminator so they live in LangGraph state (checkpointed as JSON) and
travel through the server unchanged; the constructors below are the one place their fields are defined.
Images are referenced by image-store refs (``sha256:…``); the HTML export embeds them as data URLs and draws
boxes and heat-maps on them, so the page opens anywhere without the store.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from foveate.tools.images import image_to_data_url
from foveate.tools.store import ImageStore

Step = dict[str, Any]
BOX_COLORS = ["#ff2d55", "#34c759", "#0a84ff", "#ff9f0a", "#bf5af2"]


def model_call_step(node: str, prompt: list[dict], result: Any, **extra: Any) -> Step:
    """A model call: the prompt (images as refs), every sampled output, token counts and latency."""
    return {
        "kind": "model_call",
        "node": node,
        "prompt": prompt,
        "outputs": [completion.text for completion in result.completions],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "latency_s": round(result.latency_s, 4),
        "model": result.model,
        **extra,
    }


def crop_step(node: str, image: str, box: list[float], crop: str, reason: str = "") -> Step:
    """A crop of ``image`` (ref) at ``box`` (original pixels) stored as ``crop`` (ref)."""
    return {"kind": "crop", "node": node, "image": image, "box": box, "crop": crop, "reason": reason}


def tool_call_step(node: str, name: str, arguments: Any, result: str | None = None, error: str | None = None) -> Step:
    """A tool call with its arguments and either a result (text or image ref) or an error message."""
    return {"kind": "tool_call", "node": node, "name": name, "arguments": arguments, "result": result, "error": error}


def map_step(node: str, image: str, values: np.ndarray, map_kind: str, layer: Any = None) -> Step:
    """A saliency map over ``image`` (ref); ``values`` is the grid as nested lists (small: token grid)."""
    return {
        "kind": "map",
        "node": node,
        "image": image,
        "map_kind": map_kind,
        "layer": layer,
        "values": np.asarray(values, dtype=float).round(6).tolist(),
    }


def program_step(node: str, image: str, source: str, outcome: dict[str, Any] | None, index: int = 0) -> Step:
    """A generated program (source) and, when it ran, its outcome (`tools.program.ProgramResult.to_dict`: ok,
    value or error, the call log with boxes in original pixels of ``image`` (ref), print output, counts)."""
    return {"kind": "program", "node": node, "image": image, "index": index, "source": source, "outcome": outcome}


def role_step(node: str, role: str, content: Any, **extra: Any) -> Step:
    """A turn of a role in a multi-role strategy (ProReason's dispatcher, experts, referee, summarizer): what
    the role decided or answered, as JSON data, plus e.g. the memory it saw."""
    return {"kind": "role", "node": node, "role": role, "content": content, **extra}


def answer_step(node: str, text: str) -> Step:
    return {"kind": "answer", "node": node, "text": text}


@dataclass
class Trace:
    """One run of one strategy on one question."""

    strategy: str
    question: str
    image: str | None
    answer: str
    steps: list[Step] = field(default_factory=list)
    model: str = ""
    created: float = field(default_factory=time.time)

    # ---- summaries -------------------------------------------------------------------------------------
    @property
    def model_calls(self) -> int:
        return sum(1 for step in self.steps if step["kind"] == "model_call")

    @property
    def completion_tokens(self) -> int:
        return sum(step.get("completion_tokens", 0) for step in self.steps if step["kind"] == "model_call")

    @property
    def boxes(self) -> list[list[float]]:
        return [step["box"] for step in self.steps if step["kind"] == "crop"]

    # ---- export ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_calls": self.model_calls, "completion_tokens": self.completion_tokens}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        fields = ("strategy", "question", "image", "answer", "steps", "model", "created")
        return cls(**{key: data[key] for key in fields if key in data})

    def save(self, path: str | Path, store: ImageStore | None = None) -> Path:
        """Write ``.json`` as JSON and anything else (``.html``) as the self-contained page."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix.lower() == ".json":
            target.write_text(self.to_json())
        else:
            target.write_text(render_html(self, store or ImageStore()))
        return target


# ---- HTML ----------------------------------------------------------------------------------------------
PAGE_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;background:#fafafa}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:12px 0}
.kind{font-weight:600;text-transform:uppercase;font-size:12px;color:#666}
.figure{position:relative;display:inline-block}
.figure img{max-width:480px;display:block}
.figure svg{position:absolute;left:0;top:0;width:100%;height:100%}
pre{white-space:pre-wrap;background:#f3f3f3;padding:8px;border-radius:4px;max-height:240px;overflow:auto}
.answer{font-size:20px;font-weight:600}
"""


def heatmap_image(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A semi-transparent red heat-map of ``values`` resized to ``size`` (width, height)."""
    grid = np.asarray(values, dtype=np.float32)
    span = float(grid.max() - grid.min())
    normalised = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    rgba = np.zeros((*grid.shape, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (80 * (1 - normalised)).astype(np.uint8)
    rgba[..., 3] = (200 * normalised).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").resize(size, Image.NEAREST)


def _figure(image: Image.Image, boxes: list[list[float]], overlay: Image.Image | None = None) -> str:
    """An <img> with an SVG layer drawing ``boxes`` in the image's own pixel coordinates."""
    if overlay is not None:
        image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    width, height = image.size
    rects = "".join(
        f'<rect x="{b[0]}" y="{b[1]}" width="{b[2] - b[0]}" height="{b[3] - b[1]}" fill="none" '
        f'stroke="{BOX_COLORS[i % len(BOX_COLORS)]}" stroke-width="{max(2, width // 200)}"/>'
        for i, b in enumerate(boxes)
    )
    svg = f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none">{rects}</svg>'
    return f'<div class="figure"><img src="{image_to_data_url(image)}" alt="image">{svg}</div>'


def _prompt_text(prompt: list[dict]) -> str:
    lines = []
    for message in prompt:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content or []
        text = " ".join(p if isinstance(p, str) else p.get("text", "[image]") for p in parts)
        lines.append(f"{message.get('role', '?')}: {text}")
    return "\n".join(lines)


def _render_step(step: Step, store: ImageStore) -> str:
    kind = step["kind"]
    body = ""
    if kind == "model_call":
        outputs = "\n---\n".join(step["outputs"])
        body = (
            f"<pre>{html.escape(_prompt_text(step['prompt']))}</pre><pre>{html.escape(outputs)}</pre>"
            f"<div>{step['prompt_tokens']} prompt tokens, {step['completion_tokens']} generated, "
            f"{step['latency_s']:.3f} s, {html.escape(step.get('model', ''))}</div>"
        )
    elif kind == "crop":
        body = _figure(store.get(step["image"]), [step["box"]]) + " " + _figure(store.get(step["crop"]), [])
        body += f"<div>box {step['box']} {html.escape(step.get('reason', ''))}</div>"
    elif kind == "map":
        image = store.get(step["image"])
        body = _figure(image, [], heatmap_image(np.array(step["values"]), image.size))
        body += f"<div>{html.escape(step['map_kind'])} map, layer {step.get('layer')}</div>"
    elif kind == "tool_call":
        result = step.get("error") or step.get("result") or ""
        call = f"{step['name']}({json.dumps(step['arguments'])})\n→ {result}"
        body = f"<pre>{html.escape(call)}</pre>"
    elif kind == "program":
        body = _render_program(step, store)
    elif kind == "role":
        extra = {key: value for key, value in step.items() if key not in ("kind", "node", "role", "content")}
        text = json.dumps(step["content"], indent=1) + (f"\n{json.dumps(extra, indent=1)}" if extra else "")
        body = f"<div><b>{html.escape(step['role'])}</b></div><pre>{html.escape(text)}</pre>"
    elif kind == "answer":
        body = f"<div class='answer'>{html.escape(step['text'])}</div>"
    node = step.get("node") or ""
    label = kind if node in ("", kind) else f"{kind} · {node}"  # the answer node's answer step: one word
    return f"<div class='card'><div class='kind'>{html.escape(label)}</div>{body}</div>"


def plural(count: int, noun: str) -> str:
    """``1 model call``, ``2 model calls``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _render_program(step: Step, store: ImageStore) -> str:
    """The program's source, whether it ran and how it ended, and its call log with the boxes drawn."""
    outcome = step.get("outcome")
    body = f"<pre>{html.escape(step['source'])}</pre>"
    if outcome is None:
        return body + "<div>not run (an earlier program answered)</div>"
    status = f"value {json.dumps(outcome.get('value'))}" if outcome.get("ok") else f"error: {outcome.get('error')}"
    body += f"<div>{html.escape(status)} · {outcome.get('steps', 0)} lines, {outcome.get('calls', 0)} model calls</div>"
    calls = "\n".join(
        f"{entry.get('name')}({json.dumps(entry.get('args', {}))}) → "
        f"{json.dumps(entry.get('error') or entry.get('result'))}"
        for entry in outcome.get("log", [])
    )
    if calls:
        body += f"<pre>{html.escape(calls)}</pre>"
    boxes = [box for entry in outcome.get("log", []) for box in entry.get("boxes", [])[1:]]
    if boxes and step.get("image") and step["image"] in store:
        body += _figure(store.get(step["image"]), boxes)
    if outcome.get("stdout"):
        body += f"<pre>{html.escape(outcome['stdout'])}</pre>"
    return body


def render_html(trace: Trace, store: ImageStore) -> str:
    """A single self-contained HTML page: question, answer, the image with every crop box, then each step."""
    header = f"<h1>{html.escape(trace.question)}</h1><div class='answer'>{html.escape(trace.answer)}</div>"
    header += f"<div>strategy {html.escape(trace.strategy)} · model {html.escape(trace.model)} · "
    header += f"{plural(trace.model_calls, 'model call')} · {plural(trace.completion_tokens, 'generated token')}</div>"
    if trace.image:
        header = _figure(store.get(trace.image), trace.boxes) + header
    steps = "".join(_render_step(step, store) for step in trace.steps)
    title = html.escape(f"foveate trace: {trace.question}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><div class='card'>{header}</div>{steps}</body></html>"
    )
