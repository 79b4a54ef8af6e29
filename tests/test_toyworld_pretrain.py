"""research.toyworld: the pretraining stages (codec, judges, generator, export), tiny and seeded."""
import json
import random
import shutil

import numpy as np
import pytest
import torch

from loldu_sd.toyworld import JUDGES_DIR, MARKER, PIPELINE_DIR
from loldu_sd.toyworld import concepts as C
from loldu_sd.toyworld import world as W
from loldu_sd.toyworld.judges import IMAGE_TEXT_FILE, INSTANCE_FILE
from research.toyworld import codec, common, generator, judges, pretrain


# ---- shared pieces -------------------------------------------------------------------------------------------------
def test_learning_rate_warms_up_decays_and_holds_its_floor():
    lr_at = common.lr_at
    assert lr_at(0, 4000, 1.0, 300) == pytest.approx(1 / 300) and lr_at(299, 4000, 1.0, 300) == pytest.approx(1.0)
    assert lr_at(4000, 4000, 1.0, 300) == pytest.approx(0.1) == lr_at(5999, 4000, 1.0, 300)


def test_blurred_latents_keep_a_flat_field_and_spread_a_spike_evenly():
    flat = torch.full((1, 8, 16, 16), 0.7)
    assert torch.allclose(common.gaussian_blur(flat, 1.0), flat)
    spike = torch.zeros(1, 1, 16, 16)
    spike[..., 8, 8] = 1.0
    out = common.gaussian_blur(spike, 1.0)
    assert out.sum().item() == pytest.approx(1.0) and out[0, 0, 8, 8] < 0.2
    assert out[0, 0, 8, 7] == out[0, 0, 8, 9] == out[0, 0, 7, 8] == out[0, 0, 9, 8]


def test_checkpoints_are_safetensors_that_restore_models_and_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    common.save_state(tmp_path / "s.safetensors", 7, {"m": model}, opt)
    assert (tmp_path / "s.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # not a zip/pickle archive
    again = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    assert common.load_state(tmp_path / "s.safetensors", {"m": again}, opt2) == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    x = torch.randn(2, 4)
    for m, o in ((model, opt), (again, opt2)):  # one more step from either: identical
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is never overwritten silently
        common.resume_step(tmp_path / "s.safetensors", {"m": again}, opt2, resume=False)


def test_psnr_of_identical_images_is_high_and_of_noise_is_low():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert (common.psnr(x, x) > 90).all() and (common.psnr(x, -x) < 10).all()


# ---- codec ---------------------------------------------------------------------------------------------------------
def test_codec_content_holds_rich_decorations_textures_and_held_out_pairs():
    rng = random.Random(0)
    scenes = [codec.codec_scene(rng) for _ in range(400)]
    names = {n for s in scenes for t in s.things for n, _ in t.decorations}
    assert set(W.RICH_DECORATIONS) <= names and any(len(t.decorations) == 2 for s in scenes for t in s.things)
    assert any((t.colour, t.kind) in W.HELD_OUT_PAIRS for s in scenes for t in s.things)
    images, scenes = codec.codec_batch(random.Random(1), 40)
    assert all(im.size == (64, 64) for im in images)
    textures = [im for im, s in zip(images, scenes) if not s.things]
    assert textures and len({im.getpixel((0, 0)) for im in textures}) > 1


def test_kind_targets_name_the_kind_under_each_latent_pixel():
    scene = W.Scene((W.Thing("star", "red", (), (32, 32), 17.0),))
    targets = codec.kind_targets([scene, codec.NO_OBJECT], 16)
    assert targets.shape == (2, 1 + len(W.KINDS), 16, 16) and np.allclose(targets.sum(1).numpy(), 1.0)
    assert targets[0, 1 + W.KINDS.index("star"), 8, 8] == 1.0 and targets[0, 0, 0, 0] == 1.0
    assert (targets[1, 0] == 1).all()  # a texture names no kind anywhere
    edge = (targets[0, 0] > 0) & (targets[0, 0] < 1)  # latent pixels the outline crosses share star and background
    assert edge.sum() > 8 and np.allclose(targets[0, 1 + W.KINDS.index("star")][edge] + targets[0, 0][edge], 1.0)


def test_vae_stage_trains_resumes_and_stores_the_kind_head_and_latent_scale(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    codec.train_vae(tmp_path / "a", steps=3, batch=2, seed=0, latent_channels=4)
    calls, loss = [], codec.codec_loss

    def interrupted(*args):  # the run dies in its third step, after the second step's checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(codec, "codec_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        codec.train_vae(tmp_path / "b", steps=3, batch=2, seed=0, latent_channels=4, checkpoint_every=1)
    monkeypatch.setattr(codec, "codec_loss", loss)
    codec.train_vae(tmp_path / "b", steps=3, batch=2, seed=0, latent_channels=4, resume=True, workers=2)
    a, b = (common.model_tensors(p / "vae_state.safetensors", "vae") for p in (tmp_path / "a", tmp_path / "b"))
    # resuming, with batches rendered by worker processes, repeats an uninterrupted run bit for bit
    assert all(torch.equal(a[k], b[k]) for k in a)
    head = codec.load_kind_head(tmp_path / "a", 4)
    assert head.weight.shape[:2] == (1 + len(W.KINDS), 4) and not head.weight.requires_grad
    vae = AutoencoderKL.from_pretrained(tmp_path / "a" / "vae")
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor != 0.18215
    assert codec.round_trip_psnr(vae, C.instance_images(C.CONCEPTS["star"])).shape == (5,)


# ---- judges --------------------------------------------------------------------------------------------------------
def test_instance_variants_differ_from_their_instance_in_one_respect_each():
    rng = random.Random(0)
    for _ in range(50):
        base, *variants = judges.instance_variants(rng)
        assert [v[:2] == base[:2] for v in variants] == [False, False, True]
        assert [v[2] == base[2] for v in variants] == [True, True, False]
        assert not any(C.is_held_out(*v) for v in (base, *variants))
        assert all(judges.instance_similarity(base, v) < 1 == judges.instance_similarity(v, v) for v in variants)


def test_graded_targets_weigh_each_shared_attribute():
    concept = ("star", "yellow", (("outline", "blue"), ("dot", "red")))
    objs = [concept, ("star", "yellow", ()), ("star", "yellow", (("outline", "blue"),)), ("cross", "yellow", ()),
            ("heart", "green", ())]
    row = judges.graded_targets(objs, 9.0)[0].tolist()
    assert abs(sum(row) - 1) < 1e-6 and row[0] > row[2] > row[1] > row[3] > row[4] > 0, row


def test_kind_separation_penalises_only_captions_closer_than_the_bound():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.1], [0.0, 1.0]])  # cosine 0.995 (penalised) and 0 (free)
    loss = judges.kind_separation(a, b)
    assert loss.item() == pytest.approx(0.5 * (0.995 - judges.KIND_SEPARATION) ** 2, rel=1e-2)
    assert judges.kind_separation(a[1:], b[1:]).item() == 0


def test_judges_stage_trains_the_instance_encoder_on_graded_blurred_views(tmp_path):
    (tmp_path / "judges").mkdir()
    shutil.copy(JUDGES_DIR / IMAGE_TEXT_FILE, tmp_path / "judges")  # only the missing judge is trained
    trained = judges.train_judges(tmp_path, steps=2, seed=0, batch=8)
    assert (tmp_path / "judges" / INSTANCE_FILE).is_file()
    record = json.loads((tmp_path / "judges" / "training.json").read_text())["instance_encoder"]
    assert record["steps"] == 2 and "graded" in record["targets"] and "blur" in record["augment"]
    embeddings = trained.embed_instances(C.instance_images(C.CONCEPTS["star"]))
    assert embeddings.shape == (5, 128) and embeddings.isfinite().all()


def test_image_text_judge_trains_with_kind_separation_and_its_tower_fine_tune_keeps_the_text_tower(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "judges").mkdir()
    shutil.copy(JUDGES_DIR / INSTANCE_FILE, tmp_path / "judges")
    judges.train_judges(tmp_path, steps=2, seed=0, batch=4)
    record = json.loads((tmp_path / "judges" / "training.json").read_text())
    assert "cosine <=" in record["image_text"]["kind_separation"]
    before = load_file(tmp_path / "judges" / IMAGE_TEXT_FILE)
    judges.train_judges(tmp_path, steps=2, seed=0, batch=4, image_tower_steps=2)
    after = load_file(tmp_path / "judges" / IMAGE_TEXT_FILE)
    frozen = [k for k in before if not k.startswith("image.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("image."))
    record = json.loads((tmp_path / "judges" / "training.json").read_text())
    assert record["image_tower"]["steps"] == 2 and record["image_tower"]["text_tower"] == "frozen"
    tuned = (tmp_path / "judges" / IMAGE_TEXT_FILE).read_bytes()
    judges.train_judges(tmp_path, steps=2, seed=0, batch=4, image_tower_steps=2)  # recorded: not fine-tuned twice
    assert (tmp_path / "judges" / IMAGE_TEXT_FILE).read_bytes() == tuned


def test_generated_look_is_seeded_bounded_and_keeps_the_image_recognisable():
    from loldu_sd.toyworld.judges import to_tensor

    x = to_tensor([W.render(W.sample_scene(random.Random(i))) for i in range(8)])
    a, b = judges.generated_look(x, random.Random(3)), judges.generated_look(x, random.Random(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.abs().max() <= 1
    assert not torch.equal(a, x) and (a - x).abs().mean() < 0.2


# ---- generator and export ------------------------------------------------------------------------------------------
def _run_folder(tmp_path, name: str, latent_channels: int = 8):
    from loldu_sd.toyworld.models import build_vae

    run = tmp_path / name
    build_vae(0, latent_channels).save_pretrained(run / "vae")
    return run


def test_generator_trains_the_unet_under_its_own_frozen_text_encoder_and_exports(tmp_path):
    from safetensors.torch import load_file

    from loldu_sd.toyworld import load_pipeline

    run = _run_folder(tmp_path, "run", latent_channels=4)
    generator.train_generator(run, steps=2, batch=2, seed=0, lr=1e-3)
    source = load_file(PIPELINE_DIR / "text_encoder" / "model.safetensors")
    own = load_file(run / "text_encoder" / "model.safetensors")
    assert all(torch.equal(own[k], v.float()) for k, v in source.items())  # a frozen copy, bit for bit (fp32)
    unet, ema = (common.model_tensors(run / generator.STATE_FILE, k) for k in ("unet", "ema_unet"))
    assert any(not torch.equal(unet[k], ema[k]) for k in unet)
    pipe = load_pipeline(generator.export_pipeline(run, run / "pipeline", 0))
    assert pipe.unet.config.in_channels == 4 and json.loads((run / "pipeline" / MARKER).read_text())[
        "generator_steps"] == 2
    with pytest.raises(FileNotFoundError, match="--text_encoder"):
        generator.train_generator(_run_folder(tmp_path, "bad"), steps=1, batch=2, seed=0, lr=1e-3,
                                  text_encoder=tmp_path / "nothing")


def test_later_cycles_start_from_a_pipelines_unet_and_count_every_cycles_steps(tmp_path):
    from safetensors.torch import load_file

    from loldu_sd.toyworld.models import build_unet

    earlier = tmp_path / "earlier"
    build_unet(7).half().save_pretrained(earlier / "unet")
    (earlier / MARKER).write_text(json.dumps({"generator_steps": 5000}))
    run = _run_folder(tmp_path, "run")
    generator.train_generator(run, steps=1, batch=2, seed=0, lr=1e-12, init_from=earlier)  # lr ~0: weights stay
    start = load_file(earlier / "unet" / "diffusion_pytorch_model.safetensors")
    unet = common.model_tensors(run / generator.STATE_FILE, "unet")
    assert all(torch.allclose(unet[k], v.float(), atol=1e-6) for k, v in start.items())
    marker = json.loads((generator.export_pipeline(run, run / "pipeline", 0) / MARKER).read_text())
    assert marker["generator_steps"] == 5001 and marker["cycles"] == [5000, 1]
    third = tmp_path / "third"
    shutil.copytree(run / "vae", third / "vae")
    generator.train_generator(third, steps=2, batch=2, seed=0, lr=1e-12, init_from=run / "pipeline")
    marker = json.loads((generator.export_pipeline(third, third / "pipeline", 0) / MARKER).read_text())
    assert marker["generator_steps"] == 5003 and marker["cycles"] == [5000, 1, 2]
    with pytest.raises(FileNotFoundError, match="--init_from"):
        generator.train_generator(tmp_path / "fresh", steps=1, batch=2, seed=0, lr=1e-3, init_from=tmp_path / "no")


def test_kind_weight_flag_sets_the_weight_of_the_generators_kind_loss(tmp_path):
    codec.train_vae(tmp_path / "vae_run", steps=1, batch=2, seed=0)

    def run_folder(name: str):
        run = tmp_path / name
        shutil.copytree(tmp_path / "vae_run" / "vae", run / "vae")
        shutil.copy(tmp_path / "vae_run" / codec.KIND_HEAD_FILE, run / codec.KIND_HEAD_FILE)
        return run

    threads = torch.get_num_threads()
    try:  # all three under the process-wide settings main makes (threads, flushed denormals)
        pretrain.main(["--out", str(run_folder("flag")), "--stage", "generator", "--steps", "1", "--batch", "2",
                       "--kind_weight", "0"])
        generator.train_generator(run_folder("zero"), steps=1, batch=2, seed=0, lr=8e-4, kind_weight=0.0)
        generator.train_generator(run_folder("strong"), steps=1, batch=2, seed=0, lr=8e-4, kind_weight=5.0)
    finally:  # later tests keep their own settings
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    flag, zero, strong = (common.model_tensors(tmp_path / n / generator.STATE_FILE, "unet")
                          for n in ("flag", "zero", "strong"))
    assert all(torch.equal(flag[k], zero[k]) for k in zero)
    assert any(not torch.equal(zero[k], strong[k]) for k in zero)


def test_object_weighted_loss_counts_shape_edges_more_than_flat_background():
    mse = generator.object_weighted_mse
    flat = torch.zeros(1, 3, 64, 64)
    assert mse(torch.ones(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), flat) == pytest.approx(1.0)
    scene = flat.clone()
    scene[:, :, 24:40, 24:40] = 1.0  # a square in the middle
    err_on_edge, err_in_corner = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    err_on_edge[..., 8, 5], err_in_corner[..., 0, 0] = 1.0, 1.0  # latent column 5 holds the left edge
    assert mse(err_on_edge, 0 * err_on_edge, scene) > 2 * mse(err_in_corner, 0 * err_in_corner, scene)


def test_x0_from_v_matches_the_schedulers_own_estimate():
    from loldu_sd.toyworld.models import train_scheduler

    sched, g = train_scheduler(), torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, 16, 16, generator=g), torch.randn(3, 8, 16, 16, generator=g)
    t = torch.tensor([10, 500, 990])
    noisy, v = sched.add_noise(x0, noise, t), sched.get_velocity(x0, noise, t)
    assert torch.allclose(generator.predicted_x0(sched, noisy, v, t), x0, atol=1e-4)
    sched.set_timesteps(1000)
    step = sched.step(v[1:2], 500, noisy[1:2], generator=g)  # diffusers' own v -> x0 conversion, clipped to [-1, 1]
    ours = generator.predicted_x0(sched, noisy[1:2], v[1:2], t[1:2]).clamp(-1, 1)
    assert torch.allclose(ours, step.pred_original_sample, atol=1e-4)


def test_kind_agreement_is_lowest_when_the_estimate_names_the_true_latents_kinds():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 1 + len(W.KINDS), 1)
    z = 3 * torch.randn(2, 8, 16, 16)
    right = generator.kind_agreement(head, z, z)
    assert right < generator.kind_agreement(head, z.flip(-1), z)
    assert right < generator.kind_agreement(head, torch.zeros_like(z), z)


@pytest.mark.slow
def test_recipe_runs_every_stage_and_resumes_on_a_second_call(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from loldu_sd.toyworld import load_pipeline

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TINY": "1", "WORKERS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(2):  # the second call continues every finished stage instead of refusing or retraining
        subprocess.run(["bash", str(root / "research" / "toyworld" / "recipe.sh"), str(tmp_path), "cpu"], cwd=root,
                       env=env, check=True, capture_output=True)
    pipe = load_pipeline(tmp_path / "pipeline")
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 16
