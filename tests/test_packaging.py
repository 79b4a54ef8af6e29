"""Packaging: a small core, extras for the front ends, and no top-level `eval` package in site-packages."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_needs_no_front_end_and_eval_is_not_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = " ".join(project["project"]["dependencies"]).lower()
    assert not any(name in core for name in ("gradio", "tensorboard", "accelerate", "open_clip", "matplotlib"))
    extras = project["project"]["optional-dependencies"]
    assert {"training", "studio", "eval", "dev"} <= set(extras)
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["loldu_sd*"]


def test_loading_adapters_imports_no_front_end():
    code = ("import sys, loldu_sd, loldu_sd.diffusers; "
            "print(sorted(m for m in ('gradio', 'tensorboard', 'matplotlib', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]"
