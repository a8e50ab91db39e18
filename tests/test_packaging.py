"""The wheel installs one top-level package, ``foveate``, with its data files (chat template, default config).

The build runs on a copy of the source tree so it never writes ``build/`` or ``*.egg-info`` into the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "foveate", "agents", "tools", "policies", "rl", "configs"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("dist")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (built,) = out.glob("foveate-*.whl")
    return built


def test_wheel_has_only_the_foveate_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    dist_info = {entry for entry in top_level if entry.endswith(".dist-info")}
    assert top_level - dist_info == {"foveate"}, sorted(top_level)
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("foveate-")
    for bare in ("tools", "rl", "agents", "policies", "configs"):
        assert not any(name.startswith(f"{bare}/") for name in names), bare
    for subpackage in ("agents", "tools", "policies", "rl", "configs"):
        assert f"foveate/{subpackage}/__init__.py" in names, subpackage
    assert "foveate/jobs/caption.py" in names  # `foveate caption` is mounted only if it imports


def test_wheel_ships_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "foveate/policies/chat_template.jinja" in names
    assert "foveate/configs/default.yaml" in names
    assert {"foveate/configs/rl/deepeyes.yaml", "foveate/configs/rl/visrl.yaml"} <= names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert b"foveate = foveate.cli:main" in entry_points


def test_installed_wheel_finds_its_data(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    snippet = (
        "import foveate, foveate.policies, pathlib; from foveate.config import load_config; "
        f"assert foveate.__file__.startswith({str(target)!r}), foveate.__file__; "
        "assert pathlib.Path(foveate.policies.__file__).with_name('chat_template.jinja').is_file(); "
        "print(load_config().strategy)"
    )
    env = {**{k: v for k, v in os.environ.items() if k != "FOVEATE_CONFIG"}, "PYTHONPATH": str(target)}
    completed = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "direct"
