"""The quality benchmark (eval.quality): what each method trains and ships, the codec ceiling, runs keyed by hash and
reused, the report rebuilt from committed runs alone, the gate's arithmetic and reasons, the README block, bad input,
and 2 processes equal to 1 (here and in `python -m eval dreambooth`).

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
from safetensors.torch import load_file, save_file

from loldu_sd.toyworld import CONCEPTS_DIR

pytest.importorskip("peft")
from eval import quality, quality_report, quality_store  # noqa: E402
from eval.ceiling import codec_ceiling, codec_round_trip  # noqa: E402
from eval.methods import METHODS, TI_TOKEN, variant  # noqa: E402
from eval.quality_run import BASE, Job, Settings, train, trainer_args  # noqa: E402
from loldu_sd.model import find_targets  # noqa: E402
from loldu_sd.testing import save_tiny_pipeline  # noqa: E402
from loldu_sd.toyworld import JUDGES_DIR, PIPELINE_DIR  # noqa: E402
from loldu_sd.toyworld.concepts import CONCEPTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
QUICK = ("--lr_warmup_steps", "0")  # the default 15 warm-up steps would keep 2 steps' changes tiny


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-sd", seed=0)


def trained(tiny_sd, out, name, lr=1e-2, steps=2, methods=METHODS):
    """Build `name` on fresh models, train it `steps` steps; (models, trainable, args, values before, target shapes)."""
    from loldu_sd.training.models import load_models

    method = methods[name]
    settings = Settings(str(tiny_sd), work=out, steps=(steps,), trainer_flags=QUICK)
    args = trainer_args(Job("star", name, lr, 42), settings, method)
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
    for name in ("loldu", "loldu_r8", "lora", "lora_r16", "ti", "full", "svdiff"):
        models, trainable, args, before, shapes = trained(tiny_sd, tmp_path / name, name)
        lora = sum(s[0] + s[1] for s in shapes)
        expected = {"loldu": sum(min(32, *s) + 1 for s in shapes), "loldu_r8": sum(min(8, *s) + 1 for s in shapes),
                    "lora": 4 * lora, "lora_r16": 16 * lora, "svdiff": sum(min(s) for s in shapes),
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
    assert sizes["ti"] < sizes["loldu_r8"] < sizes["loldu"] < sizes["lora"] < sizes["lora_r16"] < sizes["full"]
    assert sizes["svdiff"] < sizes["full"]
    assert set(load_file(str(tmp_path / "ti" / "files" / "learned_embeds.safetensors"))) == {TI_TOKEN}


def test_loldu_options_set_the_flags_and_widen_the_modules(tiny_sd, tmp_path):
    methods = {**METHODS}
    methods["wide"] = variant("wide=loldu:modules=attn+ff+te,sigma0=0.5,sigma_max=none,wd=0,warmup=3", methods)
    models, trainable, args, _, shapes = trained(tiny_sd, tmp_path, "wide", methods=methods)
    assert args.alpha == 16 and args.sigma_max is None and args.adam_weight_decay == 0 and args.train_text_encoder
    assert args.lr_warmup_steps == 3 and methods["wide"].definition()["options"]["sigma0"] == "0.5"
    assert set(trainable.trained) == {"unet", "text_encoder"}
    ff = find_targets(models.unet, ["ff.net.0.proj", "ff.net.2"])
    assert ff and all(hasattr(models.unet.get_submodule(n), "loldu_adapters") for n in ff)
    with pytest.raises(ValueError, match="modules=conv: LoLDU adapts nn.Linear layers only"):
        variant("c=loldu:modules=attn+conv", methods)
    with pytest.raises(ValueError, match="options are KEY=VALUE"):
        variant("c=loldu:speed=2", methods)


def test_the_codec_ceiling_scores_the_round_tripped_photos():
    from eval.scorer import Scorer
    from loldu_sd.testing import tiny_pipeline
    from loldu_sd.toyworld.concepts import concept_photos

    pipe, scorer, photos = tiny_pipeline(seed=0), Scorer.random_tiny(seed=0, device="cpu"), concept_photos("star")
    trips = codec_round_trip(pipe.vae, photos)
    assert [t.size for t in trips] == [p.size for p in photos] and trips[0].tobytes() != photos[0].tobytes()
    ceiling = codec_ceiling(pipe, "star", scorer)
    assert ceiling == codec_ceiling(pipe.vae, "star", scorer)  # the pipeline's own VAE, the mode: deterministic
    scores = scorer.score(trips, photos)
    assert ceiling["dino"] == round(scores["dino"], 4) and ceiling["clip_i"] == round(scores["clip_i"], 4)
    assert ceiling["fidelity"] == round((ceiling["dino"] + ceiling["clip_i"]) / 2, 4) and 0 < ceiling["psnr"] < 60


def record(concept, method, lr, seed, rows, real=None, ceiling=None):
    """A hand-made run record: rows = {step: (dino, clip_i, clip_t, prior)}; base runs add photos and ceiling."""
    steps = {str(s): {"dino": d, "clip_i": c, "clip_t": t, "prior": p, "fidelity": round((d + c) / 2, 4), "size": 100}
             for s, (d, c, t, p) in rows.items()}
    out = {"job": {"concept": concept, "method": method, "lr": lr, "seed": seed}, "steps": steps}
    if real:
        out["real"] = {"dino": real[0], "clip_i": real[1], "fidelity": round(sum(real) / 2, 4)}
        out["ceiling"] = {"dino": ceiling[0], "clip_i": ceiling[1], "fidelity": round(sum(ceiling) / 2, 4)}
    return out


def grid_records(full_concepts=tuple(CONCEPTS)):
    """Base 0.2 and ceiling 0.7 on every concept (gap 0.5). LoRA passes 3 of 4 concepts; full 2 (or is missing)."""
    recs = [record(c, BASE, 0.0, 0, {0: (0.2, 0.2, 0.5, 1.0)}, real=(0.9, 0.9), ceiling=(0.8, 0.6)) for c in CONCEPTS]
    for c in CONCEPTS:
        recs.append(record(c, "lora", 1e-2, 0, {1: (0.9, 0.9, 0.5, 0.5)}))  # the best fit, but the prior broke
        recs.append(record(c, "lora", 1e-3, 0, {1: (0.25, 0.25, 0.5, 0.95) if c == "eye" else (0.6, 0.5, 0.5, 0.95)}))
    full = {"star": (0.6, 0.5, 0.5, 0.9), "disc": (0.6, 0.5, 0.5, 0.9), "checker": (0.6, 0.5, 0.5, 0.7),
            "eye": (0.6, 0.5, 0.4, 0.9)}
    recs += [record(c, "full", 1e-4, s, {1: full[c]}) for c in full_concepts for s in (0, 1)]
    return recs


def test_the_gate_needs_3_of_4_concepts_and_says_why_each_fails():
    s = quality_report.summarise(grid_records(), ["lora", "full"], (1,))
    assert s["winners"]["lora"]["lr"] == 1e-3 and s["winners"]["lora"]["kept_base"]
    lora, full = s["gate"]["methods"]["lora"], s["gate"]["methods"]["full"]
    assert lora["concepts"]["star"] == {"pass": True, "closed": 0.7, "prior": 0.95, "clip_t": 0.5, "base_clip_t": 0.5,
                                        "seeds": 1, "reasons": []}
    assert lora["concepts"]["eye"]["reasons"] == ["gap closed 0.10 < 0.60"] and lora["passed"] == 3
    assert full["concepts"]["checker"]["reasons"] == ["prior 0.70 < 0.80"] and full["concepts"]["checker"]["seeds"] == 2
    assert full["concepts"]["eye"]["reasons"] == ["CLIP-T* 0.400 < 0.9 x base 0.500"] and full["passed"] == 2
    assert s["gate"]["pass"] is False
    assert s["gate"]["verdict"] == "FAIL: lora 3 of 4 concepts; full 2 of 4 concepts (>= 3 needed)"
    md = quality_report.gate_markdown(s)
    assert "| full | checker | 0.70 | 0.700 | 0.500 (0.500) | 2 | FAIL: prior 0.70 < 0.80 |" in md
    incomplete = quality_report.summarise(grid_records(("star", "disc", "checker")), ["lora", "full"], (1,))
    assert incomplete["gate"]["verdict"] == "incomplete: no runs of full/eye" and not incomplete["gate"]["pass"]


def report_flags(tmp_path):
    return ["--pretrained_model_name_or_path", str(PIPELINE_DIR), "--judges", str(JUDGES_DIR), "--steps", "1",
            "--prompts_limit", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]


def commit(records, tmp_path, settings, world):
    """Write hand-made records as committed runs of `world` (with a strip each), as run_job lays them out."""
    for r in records:
        r = {**r, "settings": settings.record(), "world": world, "method": None, "recipe": quality_store.RECIPE}
        r["key"] = quality_store.run_key({k: r[k] for k in ("job", "settings", "method", "world", "recipe")})
        folder = quality_store.run_folder(tmp_path / "runs", r["job"], r["key"])
        quality_store.write_record(folder, r)
        Image.new("RGB", (128, 64), "red").save(folder / "strip.png")


def test_the_report_is_rebuilt_from_the_committed_runs_alone_and_writes_the_readme_block(tmp_path):
    flags = report_flags(tmp_path)
    settings, _ = quality.check(quality.build_parser().parse_args(flags))
    world = quality_store.world_digest(PIPELINE_DIR, JUDGES_DIR)
    commit(grid_records(), tmp_path, settings, world)
    commit([record("star", "lora", 1e-3, 5, {1: (0.9, 0.9, 0.5, 0.95)})], tmp_path, settings,
           {**world, "pipeline": "another"})  # another pipeline's run: stale, left out
    assert quality.main(["--report", *flags]) == 0
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| codec round trip (ceiling) |  |  | 0.800 ± 0.000 | 0.600 ± 0.000 |" in md
    assert "| lora | 0.001 | 1 | 0.512 ± 0.175 | 0.438 ± 0.125 | 0.500 ± 0.000 | 0.950 ± 0.000 | 0.550 ± 0.300 |" in md
    assert "(1 others left out" in md and "**Gate: FAIL: lora 3 of 4 concepts; full 2 of 4" in md
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["world"] == world and len(saved["runs"]) == 4 + 8 + 8 and not saved["gate"]["pass"]
    assert all(not Path(r["folder"]).is_absolute() for r in saved["runs"])
    assert Image.open(tmp_path / "out" / "grid_eye.png").size == (120 + 2 * 96, 28 + 3 * 96)
    assert (tmp_path / "out" / "quality.png").stat().st_size > 1000
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- quality-table:begin -->\nold\n<!-- quality-table:end -->\nrest\n")
    assert quality.main(["--readme", str(readme), *flags]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- quality-table:begin -->\n")
    assert text.endswith("<!-- quality-table:end -->\nrest\n")
    assert "| lora | 0.001 | 0.475 | 0.55 | 0.950 | 0.500 | 100 |" in text and "Gate: FAIL: lora 3 of 4" in text
    assert "old" not in text


def test_a_committed_run_is_reused_only_under_its_key(tiny_sd, tmp_path):
    settings = Settings(str(tiny_sd), runs=tmp_path / "runs", steps=(1,), prompts_limit=2)
    world = quality_store.world_digest(tiny_sd, JUDGES_DIR)
    job = Job("star", "loldu", 1e-3, 0)
    from eval.quality_run import identity

    key = quality_store.run_key(identity(job, settings, world))
    folder = quality_store.run_folder(settings.runs, {"concept": "star", "method": "loldu", "lr": 1e-3, "seed": 0}, key)
    quality_store.write_record(folder, {"key": key, "steps": {"1": {"fidelity": 0.5, "prior": 1.0}}})
    # reused: no scorer is needed (None would fail at once if it ran)
    assert quality.run_or_reuse(job, settings, None, world, False)["key"] == key
    for other in (identity(Job("star", "loldu", 1e-3, 1), settings, world),
                  identity(job, Settings(str(tiny_sd), steps=(2,), prompts_limit=2), world),
                  identity(job, settings, {**world, "judges": "x"}),
                  {**identity(job, settings, world), "recipe": quality_store.RECIPE + 1},
                  {**identity(job, settings, world), "method": METHODS["loldu_r8"].definition()}):
        assert quality_store.run_key(other) != key
    weights = next(Path(tiny_sd).rglob("*.safetensors"))
    before = quality_store.folder_digest(tiny_sd)
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(tiny_sd, copy)
    save_file(tensors, str(copy / weights.relative_to(tiny_sd)))
    assert quality_store.folder_digest(copy) != before
    assert quality_store.folder_digest(tiny_sd) == before


def test_bad_input_is_one_line_and_status_2(tiny_sd, tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(tiny_sd), "--out", str(tmp_path)]
    for extra, message in ((["--methods", "dreambooth"], "unknown method or concept 'dreambooth'"),
                           (["--steps", "100", "50"], "--steps must increase"),
                           (["--steps", "ten"], "--steps: expected whole numbers"),
                           (["--lr", "lora=fast"], "--lr lora=fast: expected METHOD=LR"),
                           (["--methods", "ti", "--lr", "lora=1e-3"], "'lora' is not one of the --methods"),
                           (["--trainer_args=--with_prior_preservation"], "is not supported by the benchmark"),
                           (["--variant", "x=lora:sigma0=fast"], "--variant x=lora:sigma0=fast: could not convert")):
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
def test_two_processes_give_the_single_process_benchmark_and_a_rerun_reuses_it(tiny_sd, tmp_path):
    flags = ["--pretrained_model_name_or_path", str(tiny_sd), "--concepts", "star", "--methods", "loldu", "ti",
             "--lr", "loldu=1e-2", "--lr", "ti=5e-3", "--seeds", "42", "--steps", "1", "2", "--prompts_limit", "2",
             "--class_samples", "2", "--inference_steps", "2", "--trainer_args", "--lr_warmup_steps 0"]

    def where(name):
        return ["--runs", str(tmp_path / name / "runs"), "--work", str(tmp_path / name / "work"), "--out",
                str(tmp_path / name)]

    assert quality.main(flags + where("one")) == 0
    launch(["-m", "eval.quality", *flags, *where("two")], tmp_path, 2)
    one, two = (json.loads((tmp_path / d / "quality.json").read_text()) for d in ("one", "two"))
    assert [r["last"] for r in one["runs"]] == [r["last"] for r in two["runs"]] and len(one["runs"]) == 3
    assert one["table"] == two["table"] and [r["key"] for r in one["runs"]] == [r["key"] for r in two["runs"]]
    assert (tmp_path / "one" / "work" / one["runs"][1]["folder"] / "files").is_dir()  # the shipped files, apart
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "one" / "runs").rglob("result.json")}
    assert quality.main(flags + where("one")) == 0  # every run committed under its key: none recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_two_processes_give_the_single_process_dreambooth_scores(tiny_sd, tmp_path):
    import loldu_sd
    import loldu_sd.diffusers
    from loldu_sd.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    loldu_sd.diffusers.add_loldu_to_unet(pipe.unet, loldu_sd.LoLDUConfig(rank=2), "dog")
    pipe.save_loldu_weights(tmp_path / "adapter")
    flags = ["-m", "eval", "dreambooth", "--pretrained_model_name_or_path", str(tiny_sd), "--subject", "dog",
             "--adapter", str(tmp_path / "adapter"), "--reference",
             str(CONCEPTS_DIR / "star"),
             "--class_token", "dog", "--images_per_prompt", "1", "--prompts_limit", "3", "--num_inference_steps", "2",
             "--with_base", "--backbones", "toyworld"]
    results = []
    for n in (1, 2):
        launch([*flags, "--out", str(tmp_path / f"p{n}")], tmp_path, n)
        results.append(json.loads((tmp_path / f"p{n}" / "results.json").read_text()))
    assert results[0]["table"] == results[1]["table"] and results[0]["subjects"][0]["loldu"]["n_generated"] == 3
    assert len((tmp_path / "p2" / "dog" / "images" / "prompts.txt").read_text().splitlines()) == 3
