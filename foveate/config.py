"""Typed configuration, loaded from YAML (``configs/default.yaml``) and overridden by CLI flags.

Every field carries its help text in ``metadata["help"]``; ``foveate config`` style listings and the YAML file
both read from here, so the two never disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from foveate.errors import FoveateError


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class FoveateConfig:
    model: str | None = _help("model directory or cached Hub id; None = the bundled demo VLM")
    endpoint: str | None = _help("OpenAI-compatible base URL; when set, the HTTP backend is used")
    endpoint_model: str | None = _help("model name to request from the endpoint")
    wisdom_model: str | None = _help(
        "LLM for text-only roles (ProReason's dispatcher/referee/summarizer, VPD's programmer): a model directory or "
        "Hub id, or with wisdom_endpoint the served model's name; None = the eyesight model (--model/--endpoint)"
    )
    wisdom_endpoint: str | None = _help("OpenAI-compatible base URL of the wisdom LLM (needs wisdom_model)")
    strategy: str = _help("strategy used by `foveate ask` when --strategy is not given", "direct")
    max_new_tokens: int = _help("answer length cap per model call", 128)
    max_image_pixels: int = _help("images above this pixel count are refused", 40_000_000)
    min_pixels: int | None = _help("lower bound on model-input pixels (None = checkpoint's own)")
    max_pixels: int | None = _help("upper bound on model-input pixels (None = checkpoint's own)")
    device: str | None = _help("torch device for local models (None = cuda if present, else cpu)")
    home: str | None = _help("data folder (image store, threads); None = $FOVEATE_HOME or ~/.cache/foveate")
    strategy_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "keyword arguments for a strategy's build(), per strategy name (e.g. deepeyes max_turns)"},
    )

    def options_for(self, strategy: str) -> dict[str, Any]:
        """This config's build options for ``strategy`` (empty if none)."""
        options = (self.strategy_options or {}).get(strategy) or {}
        if not isinstance(options, dict):
            raise FoveateError(f"strategy_options.{strategy} must be a mapping of option names to values")
        return dict(options)

    @property
    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("FOVEATE_HOME") or Path.home() / ".cache" / "foveate")

    def with_overrides(self, **overrides: Any) -> FoveateConfig:
        """A copy with the non-None overrides applied (CLI flags left unset keep the YAML value)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise FoveateError(f"unknown config keys: {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return FoveateConfig(**values)


def load_config(path: str | Path | None = None) -> FoveateConfig:
    """Read a YAML config (default: $FOVEATE_CONFIG, else the packaged configs/default.yaml)."""
    path = path or os.environ.get("FOVEATE_CONFIG")
    try:
        text = (
            Path(path).read_text() if path else resources.files("foveate.configs").joinpath("default.yaml").read_text()
        )
        data = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as error:
        raise FoveateError(f"cannot read config {path}: {error}") from error
    if not isinstance(data, dict):
        raise FoveateError(f"config {path} must be a mapping of keys to values")
    return FoveateConfig().with_overrides(**data)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["max_turns=3", "gate=0.7"]`` → ``{"max_turns": 3, "gate": 0.7}`` (values read as YAML scalars)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FoveateError(f"option {pair!r} is not KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise FoveateError(f"option {pair!r}: cannot read the value: {error}") from error
    return options
