"""ViCrop's options (`ViCropConfig`): ``configs/vicrop.yaml``, then the registered strategy name, then per call;
and the layer the maps are read at, per model (`resolve_layer`).

Kept apart from `agents.vicrop` (the graph and the method's steps) so the strategy module stays readable; see its
docstring for what each option does to the algorithm.

The layer: an explicit ``layer`` (configs/vicrop.yaml, a registered name, ``-o layer=…``, a per-call option) wins;
else the layer calibrated for the model (``foveate vicrop calibrate --model DIR`` writes it): ``foveate_vicrop.json``
in the model's directory (the demo model ships one), else ``$FOVEATE_HOME/vicrop/<fingerprint digest>.json`` when
the directory was not writable; else the paper's rule, `paper_layer`: the layer at 14/32 of the depth, rounded
(LLaVA-1.5-7B's layer 14 of 32, the paper's choice; 12 of Qwen2.5-VL-7B's 28).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from langchain_core.runnables import RunnableConfig

from foveate.config import load_config
from foveate.errors import FoveateError
from foveate.policies.base import WhiteBoxPolicy
from foveate.policies.look_first import LOOK_FIRST
from foveate.protocol import GENERIC_PROMPT
from foveate.tools.saliency import RATIOS

METHODS = ("rel-att", "grad-att", "pure-grad")
FEEDS = ("crop", "mask")
CONFIG_ENV = "FOVEATE_VICROP_CONFIG"


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ViCropConfig:
    method: str = _help("rel-att | grad-att | pure-grad", "rel-att")
    layer: int | list[int] | None = _help(
        "decoder layer(s) the map is read at (negative counts from the end); None = the model's calibrated layer "
        "(foveate_vicrop.json), else the paper's rule (14/32 of the depth)"
    )
    ratios: list[float] = _help("window side / model input side", factory=lambda: list(RATIOS))
    input_side: int | None = _help("model input side s in pixels; None = read from the backend")
    feed: str = _help("crop = append the crop as a second image (paper); mask = CARVE-style masked image", "crop")
    high_res_block: int | None = _help(
        "images with a longer side are mapped in blocks of about this side (the paper's V* setting: 1024); "
        "None = never split"
    )
    gate: float | None = _help("answer from the question pass when p(first token) >= gate; None = never")
    rel_eps: float = _help("rel-att divides by (generic map + rel_eps × its mean)", 0.05)
    reuse_prefix: bool = _help("reuse the question pass's KV cache for the answer pass", True)
    cache_generic: bool = _help("cache generic-prompt maps per image in the image store", True)
    generic_prompt: str = _help("the generic prompt of rel-att and pure-grad", GENERIC_PROMPT)
    carve_keep: float = _help("mask feed: fraction of the image kept at full strength", 0.25)
    carve_floor: float = _help("mask feed: weight of the least-attended pixels", 0.15)
    look_first: str = _help(
        "auto | on | off: read the question map inside a look-first model's own thought (policies.look_first); "
        "auto = when the model's saved recipe answers look-first",
        "auto",
    )
    thought_tokens: int = _help("look_first: at most this many tokens of the reply whose thought is read", 24)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FoveateError(f"unknown ViCrop method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.feed not in FEEDS:
            raise FoveateError(f"unknown ViCrop feed {self.feed!r}; choose one of: {', '.join(FEEDS)}")
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise FoveateError(f"ratios must be positive numbers, got {self.ratios}")
        if self.look_first not in LOOK_FIRST:
            raise FoveateError(f"look_first must be one of {', '.join(LOOK_FIRST)}, got {self.look_first!r}")
        if self.thought_tokens < 1:
            raise FoveateError(f"thought_tokens must be at least 1, got {self.thought_tokens}")
        if self.gate is not None and not 0 < self.gate <= 1:
            raise FoveateError(f"gate must be a probability in (0, 1], got {self.gate}")

    def with_overrides(self, **overrides: Any) -> ViCropConfig:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise FoveateError(f"unknown ViCrop options: {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        return ViCropConfig(**{**asdict(self), **overrides})


def load_vicrop_config(path: str | Path | None = None, **overrides: Any) -> ViCropConfig:
    """``configs/vicrop.yaml`` (or ``path``, or $FOVEATE_VICROP_CONFIG) with ``overrides`` applied."""
    path = path or os.environ.get(CONFIG_ENV)
    source = Path(path) if path else Path(str(resources.files("foveate.configs").joinpath("vicrop.yaml")))
    try:
        data = _parse_options(str(source), source.stat().st_mtime_ns)
    except (OSError, yaml.YAMLError) as error:
        raise FoveateError(f"cannot read ViCrop config {source}: {error}") from error
    return ViCropConfig().with_overrides(**{**data, **overrides})


@functools.lru_cache(maxsize=8)
def _parse_options(source: str, stamp: int) -> dict[str, Any]:
    """A YAML file's options, parsed once per file version (``stamp`` = its mtime)."""
    data = yaml.safe_load(Path(source).read_text()) or {}
    if not isinstance(data, dict):
        raise FoveateError(f"ViCrop config {source} must be a mapping of option names to values")
    return data


def options_from(config: RunnableConfig | None) -> ViCropConfig:
    """File defaults ← the registered name's options (``vicrop_defaults``) ← this call's (``vicrop``)."""
    configurable = (config or {}).get("configurable", {}) or {}
    overrides = {**configurable.get("vicrop_defaults", {}), **configurable.get("vicrop", {})}
    path = os.environ.get(CONFIG_ENV, "")
    try:  # every node reads the options: parse and validate each combination once per config file version
        stamp = Path(path).stat().st_mtime_ns if path else 0
        return _cached_options(path, stamp, json.dumps(overrides, sort_keys=True))
    except (TypeError, OSError):  # unhashable/unserialisable overrides or an unreadable file: no cache
        return load_vicrop_config(**overrides)


@functools.lru_cache(maxsize=64)
def _cached_options(path: str, stamp: int, overrides: str) -> ViCropConfig:
    return load_vicrop_config(path or None, **json.loads(overrides))


# ---- the layer, per model ---------------------------------------------------------------------------------------
LAYER_FILE = "foveate_vicrop.json"  # {"layer": int, ...}: beside a model's weights, or under $FOVEATE_HOME/vicrop


def paper_layer(num_layers: int) -> int:
    """The paper's rule for a model nobody calibrated: the layer at 14/32 of the depth (LLaVA-1.5-7B: 14 of 32)."""
    return min(num_layers - 1, max(0, round(num_layers * 14 / 32)))


def home_layer_file(policy: WhiteBoxPolicy) -> Path:
    """Where a calibration is recorded when the model's directory is not writable: keyed by its fingerprint."""
    digest = hashlib.sha256(policy.fingerprint().encode()).hexdigest()[:16]
    return load_config().home_dir / "vicrop" / f"{digest}.json"


def calibrated_layer(policy: WhiteBoxPolicy) -> tuple[int | list[int], Path] | None:
    """The layer recorded for this model (its directory first, then $FOVEATE_HOME) and the file it came from."""
    places = [policy.model_dir / LAYER_FILE] if policy.model_dir else []
    for path in [*places, home_layer_file(policy)]:
        if path.is_file():
            try:
                layer = json.loads(path.read_text())["layer"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise FoveateError(f"cannot read the ViCrop layer from {path}: {error}") from error
            return layer, path
    return None


def record_layer(policy: WhiteBoxPolicy, layer: int, report: dict[str, Any]) -> Path:
    """Write ``layer`` (and how it was chosen) where `calibrated_layer` finds it: the model's directory when
    writable, else $FOVEATE_HOME/vicrop keyed by the model's fingerprint. Returns the file written."""
    payload = json.dumps({"layer": layer, **report}, indent=2) + "\n"
    if policy.model_dir is not None:
        try:
            (policy.model_dir / LAYER_FILE).write_text(payload)
            return policy.model_dir / LAYER_FILE
        except OSError:  # a read-only model directory (an installed package, a shared cache)
            pass
    path = home_layer_file(policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload)
    return path


def resolve_layer(layer: int | list[int] | None, policy: WhiteBoxPolicy) -> int | list[int]:
    """The layer(s) to read maps at: ``layer`` when given, else the model's calibrated layer, else `paper_layer`;
    negative indices count from the end."""
    num_layers = policy.num_layers
    if layer is None:
        found = calibrated_layer(policy)
        layer = found[0] if found is not None else paper_layer(num_layers)
    if isinstance(layer, (list, tuple)):
        return [index % num_layers if index < 0 else index for index in layer]
    return layer % num_layers if layer < 0 else layer


def generic_cache_key(policy: WhiteBoxPolicy, options: ViCropConfig, layer: Any, layout: tuple[int, int]) -> str:
    """Image-store array key of a generic map: method, layer and a digest of everything else it depends on."""
    blob = f"{policy.fingerprint()}|{options.generic_prompt}|{layer}|{layout}|{options.high_res_block}"
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    layer_label = "-".join(map(str, layer)) if isinstance(layer, list) else layer
    return f"vicrop-generic-{options.method}-L{layer_label}-{digest}"
