"""The quality benchmark (eval.quality): what each method trains and ships, LoLDU equal to the trainer, the winner
rule and gate arithmetic, the writers, bad input, and 2 processes equal to 1 (here and in `python -m eval dreambooth`).

Runs use the tiny random pipeline (loldu_sd.testing) with the toy world's concept photos and judges: the numbers
mean nothing, only their equality and bookkeeping are checked.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("peft")
from eval import quality, quality_report  # noqa: E402
from eval.methods import METHODS, TI_TOKEN  # noqa: E402
from eval.quality_run import BASE, Job, Settings, train, trainer_args  # noqa: E402
from loldu_sd.model import find_targets  # noqa: E402
from loldu_sd.testing import save_tiny_pipeline  # noqa: E402
from loldu_sd.toyworld.concepts import CONCEPTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
QUICK = ("--lr_warmup_steps", "0")  # the default 15 warm-up steps would keep 2 steps' changes tiny


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-sd", seed=0)


def trained(tiny_sd, out, name, lr=1e-2, steps=2):
    """Build `name` on fresh models, train it `steps` steps; (models, trainable, args, values before, target shapes)."""
    from loldu_sd.training.models import load_models

    method = METHODS[name]
    args = trainer_args(Job("star", name, lr, 42), Settings(str(tiny_sd), out, (steps,), trainer_flags=QUICK), method)
    torch.manual_seed(42)
    models = load_models(args, torch.device("cpu"), torch.float32)
    shapes = [models.unet.get_submodule(n).weight.shape for n in find_targets(models.unet, ["to_q", "to_k", "to_v",
                                                                                          "to_out.0"])]
    trainable = method.build(models, args, CONCEPTS["star"])
    before = {id(p): (f"{c}.{n}", p.detach().clone()) for c in ("unet", "text_encoder")
              for n, p in getattr(models, c).named_parameters()}  # by identity: the values as built
    train(args, models, trainable, (steps,), lambda step, loss: None)
    return models, trainable, args, before, shapes


def test_each_method_trains_only_its_values_and_ships_its_file(tiny_sd, tmp_path):
    sizes = {}
    for name in ("loldu", "loldu_r8", "lora", "ti", "full", "svdiff"):
        models, trainable, args, before, shapes = trained(tiny_sd, tmp_path / name, name)
        expected = {"loldu": sum(min(32, *s) + 1 for s in shapes), "loldu_r8": sum(min(8, *s) + 1 for s in shapes),
                    "lora": sum(4 * (s[0] + s[1]) for s in shapes), "svdiff": sum(min(s) for s in shapes),
                    "ti": models.text_encoder.get_input_embeddings().weight.numel()}
        if name in expected:
            assert sum(p.numel() for p in trainable.params) == expected[name], name
        ids = {id(p) for p in trainable.params}
        for c in ("unet", "text_encoder"):
            for p in getattr(models, c).parameters():
                if id(p) not in ids:
                    assert torch.equal(p, before[id(p)][1]), f"{name} changed the frozen {before[id(p)][0]}"
        if name == "ti":  # only the new token's row moved
            weight = models.text_encoder.get_input_embeddings().weight
            moved = (weight != before[id(weight)][1]).any(1)
            assert moved.nonzero().flatten().tolist() == [models.tokenizer.convert_tokens_to_ids(TI_TOKEN)]
        else:
            assert all(not torch.equal(p, before[id(p)][1]) for p in trainable.params if p.numel() > 1), name
        sizes[name] = trainable.save(tmp_path / name / "files")
    assert sizes["ti"] < sizes["loldu_r8"] < sizes["loldu"] < sizes["lora"] < sizes["full"]
    assert sizes["svdiff"] < sizes["full"]
    assert set(load_file(str(tmp_path / "ti" / "files" / "learned_embeds.safetensors"))) == {TI_TOKEN}


@pytest.mark.slow
def test_the_loldu_run_is_what_train_dreambooth_writes(tiny_sd, tmp_path):
    from loldu_sd.training import train_dreambooth

    _, trainable, args, _, _ = trained(tiny_sd, tmp_path / "ours", "loldu", steps=3)
    ours = load_file(str(trainable.savers[0](tmp_path / "ours")))
    args.output_dir = str(tmp_path / "trainer")
    args.checkpointing_steps = 1000
    theirs = load_file(str(train_dreambooth(args).adapter_path))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["unet.loldu.z"], torch.zeros_like(ours["unet.loldu.z"]))


def record(concept, method, lr, seed, rows, real=None):
    """A hand-made run record: rows = {step: (dino, clip_i, clip_t, prior)}."""
    steps = {str(s): {"dino": d, "clip_i": c, "clip_t": t, "prior": p, "fidelity": (d + c) / 2, "size": 100}
             for s, (d, c, t, p) in rows.items()}
    out = {"job": {"concept": concept, "method": method, "lr": lr, "seed": seed}, "steps": steps}
    return {**out, "real": {"dino": real[0], "clip_i": real[1]}} if real else out


def test_winner_rule_and_gate_arithmetic():
    recs = [record("star", BASE, 0.0, 0, {0: (0.2, 0.2, 0.5, 1.0)}, real=(0.8, 0.6)),  # fidelity 0.2 -> photos 0.7
            # lr 1e-2 fits best but breaks the prior; 1e-3 is the winner: gap closed (0.55 - 0.2) / 0.5 = 0.7
            record("star", "lora", 1e-2, 0, {1: (0.9, 0.7, 0.5, 0.5)}),
            record("star", "lora", 1e-3, 0, {1: (0.6, 0.5, 0.46, 0.95)}),
            record("star", "full", 1e-3, 0, {1: (0.5, 0.4, 0.5, 0.95)}),  # closed 0.5: FAIL
            record("star", "full", 1e-3, 1, {1: (0.5, 0.4, 0.40, 0.95)})]  # and CLIP-T 0.45 < 0.9 x 0.5
    s = quality_report.summarise(recs, ["lora", "full"], (1,))
    assert s["winners"]["lora"]["lr"] == 1e-3 and s["winners"]["lora"]["kept_base"]
    assert s["gate"]["lora"]["star"] == {"pass": True, "closed": 0.7, "clip_t": 0.46, "base_clip_t": 0.5,
                                         "prior": 0.95}
    assert s["gate"]["full"]["star"]["pass"] is False and s["gate"]["full"]["star"]["closed"] == 0.5
    full = [r for r in s["table"] if r["method"] == "full"][0]
    assert full["clip_t"] == {"mean": 0.45, "std": 0.0707, "n": 2}
    lines = quality_report.gate_lines(s)
    assert lines[0].startswith("gate lora  star     PASS") and "FAIL" in lines[1]


def test_writers_table_json_chart_and_grid(tmp_path):
    recs = [record("star", BASE, 0.0, 0, {0: (0.2, 0.2, 0.5, 1.0)}, real=(0.8, 0.6)),
            record("star", "loldu", 1e-2, 42, {1: (0.3, 0.3, 0.5, 0.99), 2: (0.4, 0.35, 0.5, 0.98)})]
    for key in ("star/base/step0.png", "star/loldu/lr0.01-seed42/step2.png"):
        (tmp_path / "runs" / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (128, 64), "red").save(tmp_path / "runs" / key)
    settings = Settings("pipe", tmp_path, (1, 2), prompts_limit=2)
    quality.write_outputs(recs, settings, ["loldu"], {"loldu": (1e-2,)})
    md = (tmp_path / "quality.md").read_text()
    assert "| loldu | 0.01 | 2 | 0.400 ± 0.000 | 0.350 ± 0.000 | 0.500 ± 0.000 | 0.980 ± 0.000 | 0.350 ± 0.000 |" in md
    assert "| concept images |" in md and "| base model |" in md and "100 B" in md
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["winners"]["loldu"]["lr"] == 0.01 and len(saved["runs"]) == 2 and saved["lr_grids"]["loldu"]
    assert Image.open(tmp_path / "grid_star.png").size == (120 + 2 * 96, 28 + 2 * 96)
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_bad_input_is_one_line_and_status_2(tiny_sd, tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(tiny_sd), "--out", str(tmp_path)]
    for extra, message in ((["--methods", "dreambooth"], "unknown method or concept 'dreambooth'"),
                           (["--steps", "100", "50"], "--steps must increase"),
                           (["--steps", "ten"], "--steps: expected whole numbers"),
                           (["--lr", "lora=fast"], "--lr lora=fast: expected METHOD=LR"),
                           (["--methods", "ti", "--lr", "lora=1e-3"], "'lora' is not one of the --methods"),
                           (["--trainer_args=--with_prior_preservation"], "is not supported by the benchmark")):
        assert quality.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert quality.main(["--pretrained_model_name_or_path", str(tmp_path / "none")]) == 2
    assert "no pipeline folder there" in capsys.readouterr().err


def launch(args, tmp_path, processes):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_give_the_single_process_benchmark(tiny_sd, tmp_path):
    flags = ["--pretrained_model_name_or_path", str(tiny_sd), "--concepts", "star", "--methods", "loldu", "ti",
             "--lr", "loldu=1e-2", "--lr", "ti=5e-3", "--seeds", "42", "--steps", "1", "2", "--prompts_limit", "2",
             "--class_samples", "2", "--inference_steps", "2", "--trainer_args", "--lr_warmup_steps 0"]
    assert quality.main(flags + ["--out", str(tmp_path / "one")]) == 0
    launch(["-m", "eval.quality", *flags, "--out", str(tmp_path / "two")], tmp_path, 2)
    one, two = (json.loads((tmp_path / d / "quality.json").read_text()) for d in ("one", "two"))
    assert [r["steps"] for r in one["runs"]] == [r["steps"] for r in two["runs"]]
    assert one["table"] == two["table"] and len(one["runs"]) == 3


@pytest.mark.slow
def test_two_processes_give_the_single_process_dreambooth_scores(tiny_sd, tmp_path):
    import loldu_sd
    import loldu_sd.diffusers
    from loldu_sd.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    loldu_sd.diffusers.add_loldu_to_unet(pipe.unet, loldu_sd.LoLDUConfig(rank=2), "dog")
    pipe.save_loldu_weights(tmp_path / "adapter")
    flags = ["-m", "eval", "dreambooth", "--pretrained_model_name_or_path", str(tiny_sd), "--subject", "dog",
             "--adapter", str(tmp_path / "adapter"), "--reference", str(ROOT / "assets" / "toyworld" / "concepts" /
                                                                          "star"),
             "--class_token", "dog", "--images_per_prompt", "1", "--prompts_limit", "3", "--num_inference_steps", "2",
             "--with_base", "--backbones", "toyworld"]
    results = []
    for n in (1, 2):
        launch([*flags, "--out", str(tmp_path / f"p{n}")], tmp_path, n)
        results.append(json.loads((tmp_path / f"p{n}" / "results.json").read_text()))
    assert results[0]["table"] == results[1]["table"] and results[0]["subjects"][0]["loldu"]["n_generated"] == 3
    assert len((tmp_path / "p2" / "dog" / "images" / "prompts.txt").read_text().splitlines()) == 3
