"""Shared fixtures. The tiny model is built once per session: a random-weights Qwen2-VL with the project's own
tokenizer and chat template (``policies.tiny``), small enough that every test can run it on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def foveate_home(tmp_path_factory: pytest.TempPathFactory):
    """Point ``FOVEATE_HOME`` at a per-session temporary directory so no test writes to ``~/.cache/foveate``.

    Set for the whole session (subprocesses inherit it); yields the directory.
    """
    home = tmp_path_factory.mktemp("foveate-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FOVEATE_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weights Qwen2-VL directory (built once per session, seed 0).

    ``init_std=0.5`` (instead of the default 0.02) makes the random model's greedy output depend on its input;
    with the default init every prompt decodes to the same token, so batched-vs-single comparisons prove nothing.
    """
    from foveate.policies.tiny import TinyConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny", TinyConfig(init_std=0.5), seed=0)


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir: Path):
    """The in-process ``TransformersVLM`` on the tiny model (shared: do not mutate it)."""
    from foveate.policies.transformers_vlm import TransformersVLM

    policy = TransformersVLM(tiny_model_dir)
    yield policy
    policy.close()


@pytest.fixture
def quick_train():
    """A factory of `TrainConfig`s for Trainer runs of a step or two in the test process (no warm-up, a log every
    step, no DataLoader worker); keyword arguments override or add fields."""
    from foveate.rl.sft import TrainConfig

    def make(**overrides):
        settings = {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "logging_steps": 1, "dataloader_workers": 0}
        return TrainConfig(**{**settings, **overrides})

    return make


@pytest.fixture(scope="session")
def demo_policy():
    """The shipped demo VLM through the API's policy cache (loaded once per session; do not mutate it)."""
    from foveate.api import make_policy

    return make_policy()
