"""`import loldu_sd.diffusers` is the only thing that adds methods to diffusers classes, and only to SD/SDXL pipelines.

Each check runs in a fresh interpreter: the test process itself has imported the opt-in through other test modules.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("load_loldu_weights", "fuse_loldu", "per_prompt_adapters")

# a whole library session without the opt-in: add, save, load, mix, per-prompt render, then every front-end module
LIBRARY_SESSION = """
import tempfile, torch, loldu_sd
from diffusers import StableDiffusionPipeline
from loldu_sd import pipeline as P
from loldu_sd.testing import tiny_pipeline

pipe = tiny_pipeline(seed=0)
pipe.set_progress_bar_config(disable=True)
P.add_loldu_to_pipeline(pipe, loldu_sd.LoLDUConfig(rank=2), "dog", text_encoders=True)
folder = P.save_loldu_weights(pipe, tempfile.mkdtemp(), adapter_name="dog").parent
P.unload_loldu_weights(pipe)
name = P.load_loldu_weights(pipe, folder, adapter_name="dog")
P.set_loldu_adapters(pipe, [name], [0.5])
with loldu_sd.per_prompt_adapters(pipe, ["dog", None]):
    pipe(["a", "b"], num_inference_steps=1, height=32, width=32, output_type="latent")
P.fuse_loldu(pipe); P.unfuse_loldu(pipe)
P.export_lora(pipe, tempfile.mkdtemp(), adapter_name="dog")
import loldu_sd.generate, loldu_sd.training.loop, loldu_sd.training.outputs, loldu_sd.training.checkpoints
import loldu_sd.training.models, loldu_sd.training.step, loldu_sd.studio.service, loldu_sd.studio.library
assert not any(hasattr(StableDiffusionPipeline, m) for m in {methods}), "a library call patched diffusers"
assert not any(hasattr(type(pipe), m) for m in {methods})
print("clean")
"""


def run(code: str) -> str:
    """stdout of `code` in a fresh interpreter (fails the test with its stderr when it fails)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_library_calls_and_front_end_imports_add_no_methods():
    """Every library function works on a pipeline without the methods, and none of them adds any."""
    assert run(LIBRARY_SESSION.format(methods=METHODS)).strip().endswith("clean")


def test_opt_in_attaches_to_sd_and_sdxl_pipelines_only():
    """SD 1/2 and SDXL txt2img/img2img/inpaint/ControlNet gain the methods; AnimateDiff/Kandinsky/the mixins do not."""
    code = """
import diffusers, loldu_sd.diffusers as opt_in
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
adapted = [getattr(diffusers, n) for n in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
           "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline",
           "StableDiffusionControlNetPipeline")]
assert all(c.load_loldu_weights is opt_in.load_loldu_weights for c in adapted)
assert all(c.per_prompt_adapters is opt_in.per_prompt_adapters for c in adapted)
others = [StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin, diffusers.DiffusionPipeline,
          diffusers.AnimateDiffPipeline, diffusers.Kandinsky3Pipeline, diffusers.StableDiffusionPAGPipeline,
          diffusers.IFPipeline, diffusers.FluxPipeline]
assert not [c.__name__ for c in others if any(hasattr(c, m) for m in ("load_loldu_weights", "fuse_loldu"))]
print("ok")
"""
    assert run(code).strip() == "ok"


def test_no_setattr_on_diffusers_classes_outside_the_opt_in():
    """The repeatable grep of issue 34: setattr on a class appears in loldu_sd/diffusers.py alone."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("loldu_sd", "eval", "research")
            for p in sorted((ROOT / folder).rglob("*.py")) if p != ROOT / "loldu_sd" / "diffusers.py"
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"setattr\((cls|_?mixin|\w*Pipeline\w*|\w*LoaderMixin)\b", line)]
    hits += [str(p.relative_to(ROOT)) for p in (ROOT / "app.py", ROOT / "train_dreambooth_loldu.py")
             if "setattr(" in p.read_text()]
    assert hits == []
