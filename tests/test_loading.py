"""Model-argument checks that must fail at once, before any model or Hub lookup."""

from __future__ import annotations

import pytest

from foveate.errors import ModelLoadError
from foveate.policies.loading import resolve_model_path


def test_existing_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(tmp_path)


@pytest.mark.parametrize("name", ["./missing-model", "/nonexistent/model", "~/nope/model", "a/b/c"])
def test_missing_paths_are_refused(name):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_path(name)


@pytest.mark.parametrize("name", ["typo", "someone/not-a-cached-model"])
def test_uncached_hub_ids_fail_fast(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing is downloaded, nothing is found
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_path(name)


def test_model_directory_is_returned(tiny_model_dir):
    assert resolve_model_path(tiny_model_dir) == str(tiny_model_dir)
