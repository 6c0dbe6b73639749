"""The README front matter is a valid Hugging Face Space configuration for this repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REQUIRED_KEYS = {"title", "sdk", "sdk_version", "app_file", "python_version", "license"}


@pytest.fixture(scope="module")
def front_matter(repo_root: Path) -> dict:
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "README.md must start with a --- YAML block (the Space configuration)"
    return yaml.safe_load(match.group(1))


def _pinned_gradio(repo_root: Path) -> str:
    for line in (repo_root / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"gradio(?:\[[\w,]+\])?==([\w.]+)", line.split("#")[0].strip())
        if match:
            return match.group(1)
    raise AssertionError("requirements.txt does not pin gradio==<version>")


def test_space_configuration(front_matter: dict, repo_root: Path) -> None:
    assert set(front_matter) >= REQUIRED_KEYS
    assert front_matter["sdk"] == "gradio"
    assert str(front_matter["sdk_version"]) == _pinned_gradio(repo_root)
    assert (repo_root / front_matter["app_file"]).is_file()
    assert re.fullmatch(r"3\.\d+", str(front_matter["python_version"]))
    assert front_matter["license"] == "apache-2.0"
    assert len(front_matter.get("short_description", "")) <= 60
    models = front_matter.get("models")
    assert isinstance(models, list) and models
    assert all(re.fullmatch(r"[\w.-]+/[\w.-]+", model) for model in models)


def test_space_models_list_the_served_base(front_matter: dict) -> None:
    from supportlm.embedded import EMBEDDED_UPSTREAM_ID

    assert EMBEDDED_UPSTREAM_ID in front_matter["models"]
