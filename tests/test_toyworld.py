"""The toy world: rendering, captions, held-out concepts and pairs, and its tokenizer."""
import random

import numpy as np
import pytest

from loldu_sd.toyworld import concepts as C
from loldu_sd.toyworld import world as W
from loldu_sd.toyworld.models import bpe_merges, toy_tokenizer, vocabulary_words


def test_render_is_deterministic_and_draws_the_object():
    scene = W.Scene((W.Thing("square", "red", (), (32, 32), 12.0),), "plain", "blue")
    a, b = np.asarray(W.render(scene)), np.asarray(W.render(scene))
    assert a.shape == (64, 64, 3) and (a == b).all()
    assert tuple(a[32, 32]) == W.COLOURS["red"] and tuple(a[2, 2]) == W.COLOURS["blue"]


@pytest.mark.parametrize("kind", W.KINDS)
def test_every_kind_covers_a_plausible_area(kind):
    img = np.asarray(W.render(W.Scene((W.Thing(kind, "black", (), (32, 32), 12.0),), "plain", "white")))
    covered = (img.sum(axis=2) < 300).mean()
    assert 0.04 < covered < 0.25, covered  # a radius-12 shape on a 64x64 canvas: neither a speck nor a fill


def test_kind_masks_mark_each_object_under_its_own_kind():
    scene = W.Scene((W.Thing("square", "red", (), (20, 20), 8.0), W.Thing("ring", "blue", (), (44, 44), 10.0)))
    masks = [np.asarray(m) for m in W.kind_masks(scene)]
    square, ring = W.KINDS.index("square"), W.KINDS.index("ring")
    assert masks[square][20, 20] == 255 and masks[square][44, 44] == 0 and masks[ring][44, 44] == 0  # the ring's hole
    assert masks[ring][44, 35] == 255 and sum(m.sum() for m in masks) == masks[square].sum() + masks[ring].sum()


def test_captions_follow_dreambooth_grammar():
    scene = W.Scene((W.Thing("star", "orange", (("dot", "blue"),)),), "striped", "green", "small",
                    "in the top left corner")
    assert W.caption(scene) == ("a photo of a small orange star with a blue dot in the top left corner "
                                "on a green striped background")
    two = W.Scene((W.Thing("cross", "red"), W.Thing("cross", "red")), "plain", "white")
    assert W.caption(two) == "a photo of two red crosses on a white background"
    assert W.caption(W.Scene((W.Thing("ring", "orange"),), says=frozenset())) == "a photo of a ring"


def test_pretraining_never_draws_held_out_pairs_or_concepts():
    rng = random.Random(0)
    for _ in range(3000):
        kind, colour, decorations = W.sample_object(rng)
        assert (colour, kind) not in W.HELD_OUT_PAIRS
        assert len(decorations) <= 1 and all(d in W.DECORATIONS for d, _ in decorations)
        assert not C.is_held_out(kind, colour, decorations)


def test_concepts_have_five_varied_photos_and_25_prompts():
    for concept in C.CONCEPTS.values():
        photos = [np.asarray(im) for im in C.instance_images(concept)]
        assert len(photos) == 5 and all(not (p == photos[0]).all() for p in photos[1:])
        texts = C.prompts(concept)
        assert len(texts) == 25 == len(set(texts)) and all("sks" in t for t in texts)
        assert concept.class_noun in W.KINDS


def test_committed_concept_images_match_the_generator(tmp_path):
    from pathlib import Path

    from PIL import Image

    committed = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "concepts"
    C.write_concept(C.CONCEPTS["eye"], tmp_path / "eye")
    for i in range(5):
        a = np.asarray(Image.open(committed / "eye" / f"{i:02d}.png"))
        assert (a == np.asarray(Image.open(tmp_path / "eye" / f"{i:02d}.png"))).all()
    assert (committed / "eye.json").read_text() == (tmp_path / "eye.json").read_text()


def test_bpe_makes_every_world_word_one_token_and_leaves_the_identifier_rare():
    tok = toy_tokenizer()
    for word in vocabulary_words():
        assert len(tok.tokenize(word)) == 1, word
    pieces = tok.tokenize("a photo of a sks star")
    assert pieces[4:7] == ["s", "k", "s</w>"]  # byte-level tokens no caption ever uses
    merges = bpe_merges(["abab", "abc"])
    assert merges[0] == "a b"


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import CLIPTokenizer

    tok = toy_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of two small yellow triangles with an orange outline on a purple gradient background"
    assert again(text).input_ids == tok(text).input_ids and len(tok(text).input_ids) <= tok.model_max_length


# ---- the committed judges ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judges():
    from loldu_sd.toyworld import JUDGES_DIR
    from loldu_sd.toyworld.judges import load_judges

    return load_judges(JUDGES_DIR)


def test_instance_judge_tells_each_concept_from_the_others(judges):
    import torch

    embs = {n: judges.embed_instances(C.instance_images(c)) for n, c in C.CONCEPTS.items()}
    for name, e in embs.items():
        own = (e @ e.T)[~torch.eye(len(e), dtype=torch.bool)].mean()
        for other, f in embs.items():
            if other != name:
                assert own > (e @ f.T).mean() + 0.3, (name, other)  # the closest pair, star-disc: 0.46


def test_instance_judge_ranks_partial_matches_between_the_concept_and_strangers(judges):
    import random

    from loldu_sd.toyworld.world import Scene, Thing, render

    def photos(kind, colour, decorations=()):
        rng = random.Random(0)
        return [render(Scene((Thing(kind, colour, decorations, (rng.uniform(22, 42), rng.uniform(22, 42)),
                                    rng.uniform(10, 17)),), "plain", bg))
                for bg in ("white", "green", "purple", "black")]

    star = C.CONCEPTS["star"]
    ref = judges.embed_instances(C.instance_images(star)).mean(0)
    score = {name: (judges.embed_instances(photos(*obj)) @ ref).mean().item() for name, obj in {
        "concept": ("star", "yellow", star.decorations), "plain star": ("star", "yellow"),
        "decorated cross": ("cross", "yellow", star.decorations), "plain circle": ("circle", "yellow"),
        "stranger": ("triangle", "purple")}.items()}
    assert score["concept"] > max(score["plain star"], score["decorated cross"]) + 0.1, score
    assert min(score["plain star"], score["decorated cross"]) > score["plain circle"] > score["stranger"], score


def test_instance_variants_differ_from_their_instance_in_one_respect_each():
    import random

    from loldu_sd.toyworld.concepts import is_held_out
    from loldu_sd.toyworld.judges import instance_similarity, instance_variants

    rng = random.Random(0)
    for _ in range(50):
        base, *variants = instance_variants(rng)
        assert [v[:2] == base[:2] for v in variants] == [False, False, True]
        assert [v[2] == base[2] for v in variants] == [True, True, False]
        assert not any(is_held_out(*v) for v in (base, *variants))
        assert all(instance_similarity(base, v) < 1 == instance_similarity(v, v) for v in variants)


def test_graded_targets_weigh_each_shared_attribute():
    from loldu_sd.toyworld.judges import graded_targets

    concept = ("star", "yellow", (("outline", "blue"), ("dot", "red")))
    objs = [concept, ("star", "yellow", ()), ("star", "yellow", (("outline", "blue"),)), ("cross", "yellow", ()),
            ("heart", "green", ())]
    row = graded_targets(objs, 9.0)[0].tolist()
    assert abs(sum(row) - 1) < 1e-6 and row[0] > row[2] > row[1] > row[3] > row[4] > 0, row


def test_judges_stage_trains_the_instance_encoder_on_graded_blurred_views(tmp_path):
    import json
    import shutil

    from loldu_sd.toyworld import JUDGES_DIR
    from loldu_sd.toyworld.judges import IMAGE_TEXT_FILE, INSTANCE_FILE, train_judges

    (tmp_path / "judges").mkdir()
    shutil.copy(JUDGES_DIR / IMAGE_TEXT_FILE, tmp_path / "judges")  # only the missing judge is trained
    judges = train_judges(tmp_path, steps=2, seed=0, batch=8)
    assert (tmp_path / "judges" / INSTANCE_FILE).is_file()
    record = json.loads((tmp_path / "judges" / "training.json").read_text())["instance_encoder"]
    assert record["steps"] == 2 and "graded" in record["targets"] and "blur" in record["augment"]
    embeddings = judges.embed_instances(C.instance_images(C.CONCEPTS["star"]))
    assert embeddings.shape == (5, 128) and embeddings.isfinite().all()


def test_image_tower_fine_tune_keeps_the_text_tower_the_generator_conditions_on(tmp_path):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from loldu_sd.toyworld import JUDGES_DIR
    from loldu_sd.toyworld.judges import IMAGE_TEXT_FILE, INSTANCE_FILE, train_judges

    (tmp_path / "judges").mkdir()
    for name in (IMAGE_TEXT_FILE, INSTANCE_FILE):
        shutil.copy(JUDGES_DIR / name, tmp_path / "judges")
    # no training.json: judges copied without their record still get the fine-tune, once
    train_judges(tmp_path, steps=2, seed=0, batch=4, image_tower_steps=2)
    before, after = load_file(JUDGES_DIR / IMAGE_TEXT_FILE), load_file(tmp_path / "judges" / IMAGE_TEXT_FILE)
    frozen = [k for k in before if not k.startswith("image.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the generator's text tower, bit for bit
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("image."))
    record = json.loads((tmp_path / "judges" / "training.json").read_text())
    assert record["image_tower"]["steps"] == 2 and record["image_tower"]["text_tower"] == "frozen"
    tuned = (tmp_path / "judges" / IMAGE_TEXT_FILE).read_bytes()
    train_judges(tmp_path, steps=2, seed=0, batch=4, image_tower_steps=2)  # recorded: not fine-tuned twice
    assert (tmp_path / "judges" / IMAGE_TEXT_FILE).read_bytes() == tuned


def test_generated_look_is_seeded_bounded_and_keeps_the_image_recognisable():
    import torch

    from loldu_sd.toyworld.judges import generated_look, to_tensor

    x = to_tensor([W.render(W.sample_scene(random.Random(i))) for i in range(8)])
    a, b = generated_look(x, random.Random(3)), generated_look(x, random.Random(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.abs().max() <= 1
    assert not torch.equal(a, x) and (a - x).abs().mean() < 0.2


def test_image_text_judge_reads_kind_colour_and_background_of_renders(judges):
    from eval.toyworld import attribute_hits, probe_prompts, rendered

    triples = probe_prompts(held_out=False, n=24, seed=1)
    hits = attribute_hits(judges, rendered(triples, seed=1), triples)
    assert sum(hits["colour"]) >= 23 and sum(hits["background"]) >= 23 and sum(hits["kind"]) >= 19, hits


def test_kind_rows_count_each_prompted_kind_and_name_the_base_models_confusions():
    from eval.toyworld import kind_rows

    answers = {"rendered": [("star", "star"), ("star", "star"), ("ring", "ring")],
               "base model": [("star", "cross"), ("star", "star"), ("ring", "circle")]}
    rows = {r["kind"]: r for r in kind_rows(answers)}
    assert set(rows) == set(W.KINDS)
    assert rows["star"]["n"] == 2 and rows["star"]["rendered"] == 1.0 and rows["star"]["base model"] == 0.5
    assert rows["star"]["base model's wrong answers"] == "cross 1"
    assert rows["ring"]["base model"] == 0.0 and rows["ring"]["base model's wrong answers"] == "circle 1"
    assert rows["heart"]["n"] == 0 and rows["heart"]["base model's wrong answers"] == "-"


def test_kind_probe_agrees_with_a_persons_labels_of_generated_images(judges):
    from eval.toyworld import eye_label_agreement

    agreement = eye_label_agreement(judges)
    assert agreement["n"] == 96 and agreement["eye = prompt"] == 1.0  # the labels as recorded (docs/toyworld.md)
    # measured 0.625 (60 of 96); the judge before its image tower's fine-tune: 0.573 (55)
    assert agreement["judge = eye"] >= 0.6, agreement


def test_eval_score_runs_on_the_toyworld_backbones(tmp_path):
    import json
    from pathlib import Path

    from eval.__main__ import main

    star = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "concepts" / "star"
    assert main(["score", "--generated", str(star), "--reference", str(star), "--prompt", "a photo of a sks star",
                 "--backbones", "toyworld", "--out", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["dino_backbone"] == "toyworld-instance" and scores["dino"] > 0.8 and "note" not in scores


# ---- pretraining ---------------------------------------------------------------------------------------------------
def test_noise_schedule_leaves_no_background_in_the_starting_noise():
    from loldu_sd.toyworld.models import sample_scheduler, train_scheduler

    train, sample = train_scheduler(), sample_scheduler()
    assert train.config.prediction_type == sample.config.prediction_type == "v_prediction"
    abar = float(train.alphas_cumprod[-1])
    # a background colour is the mean over 16x16 latent positions: its SNR in the sampler's starting noise
    assert abar / (1 - abar) * 256 < 0.05  # SD's scaled-linear schedule: 1.2, and the model read the noise


def test_learning_rate_warms_up_decays_and_holds_its_floor():
    from loldu_sd.toyworld.pretrain import lr_at

    assert lr_at(0, 4000, 1.0, 300) == pytest.approx(1 / 300) and lr_at(299, 4000, 1.0, 300) == pytest.approx(1.0)
    assert lr_at(4000, 4000, 1.0, 300) == pytest.approx(0.1) == lr_at(5999, 4000, 1.0, 300)


def test_generator_stage_trains_the_unet_under_the_judges_frozen_text_tower(tmp_path):
    import shutil

    import torch

    from loldu_sd.toyworld import JUDGES_DIR
    from loldu_sd.toyworld.judges import load_judges
    from loldu_sd.toyworld.models import build_vae
    from loldu_sd.toyworld.pretrain import train_generator

    build_vae(0).save_pretrained(tmp_path / "vae")
    shutil.copytree(JUDGES_DIR, tmp_path / "judges")
    train_generator(tmp_path, steps=2, batch=2, seed=0, lr=1e-3)
    state = torch.load(tmp_path / "generator_state.pt", weights_only=True)
    tower = load_judges(JUDGES_DIR).image_text.text.state_dict()
    assert state["step"] == 2 and all(torch.equal(state["ema_te"][k], v) for k, v in tower.items())
    assert any(not torch.equal(a, b) for a, b in zip(state["unet"].values(), state["ema_unet"].values()))


def test_later_cycles_start_from_a_pipelines_unet_and_count_every_cycles_steps(tmp_path):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from loldu_sd.toyworld import JUDGES_DIR, MARKER
    from loldu_sd.toyworld.models import build_unet, build_vae
    from loldu_sd.toyworld.pretrain import export_pipeline, train_generator

    earlier = tmp_path / "earlier"
    build_unet(7).half().save_pretrained(earlier / "unet")
    (earlier / MARKER).write_text(json.dumps({"generator_steps": 5000}))
    run = tmp_path / "run"
    build_vae(0).save_pretrained(run / "vae")
    shutil.copytree(JUDGES_DIR, run / "judges")
    train_generator(run, steps=1, batch=2, seed=0, lr=1e-12, init_from=earlier)  # lr ~0: the weights stay put
    state = torch.load(run / "generator_state.pt", weights_only=True)
    start = load_file(earlier / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(state["unet"][k], v.float(), atol=1e-6) for k, v in start.items())
    marker = json.loads((export_pipeline(run, run / "pipeline", 0) / MARKER).read_text())
    assert marker["generator_steps"] == 5001 and marker["cycles"] == [5000, 1]
    third = tmp_path / "third"
    shutil.copytree(run / "vae", third / "vae")
    shutil.copytree(JUDGES_DIR, third / "judges")
    train_generator(third, steps=2, batch=2, seed=0, lr=1e-12, init_from=run / "pipeline")
    marker = json.loads((export_pipeline(third, third / "pipeline", 0) / MARKER).read_text())
    assert marker["generator_steps"] == 5003 and marker["cycles"] == [5000, 1, 2]
    with pytest.raises(FileNotFoundError, match="--init_from"):
        train_generator(tmp_path / "fresh", steps=1, batch=2, seed=0, lr=1e-3, init_from=tmp_path / "nothing")


def test_kind_weight_flag_sets_the_weight_of_the_generators_kind_loss(tmp_path):
    import shutil

    import torch

    from loldu_sd.toyworld import JUDGES_DIR
    from loldu_sd.toyworld.pretrain import KIND_HEAD_FILE, main, train_generator, train_vae

    (tmp_path / "vae_run").mkdir()
    train_vae(tmp_path / "vae_run", steps=1, batch=2, seed=0)

    def run_folder(name: str):
        run = tmp_path / name
        shutil.copytree(tmp_path / "vae_run" / "vae", run / "vae")
        shutil.copytree(JUDGES_DIR, run / "judges")
        shutil.copy(tmp_path / "vae_run" / KIND_HEAD_FILE, run / KIND_HEAD_FILE)
        return run

    def unet_of(run) -> dict:
        return torch.load(run / "generator_state.pt", weights_only=True)["unet"]

    threads = torch.get_num_threads()
    try:  # all three under the process-wide settings main makes (threads, flushed denormals)
        main(["--out", str(run_folder("flag")), "--stage", "generator", "--steps", "1", "--batch", "2",
              "--kind_weight", "0"])
        train_generator(run_folder("zero"), steps=1, batch=2, seed=0, lr=8e-4, kind_weight=0.0)
        train_generator(run_folder("strong"), steps=1, batch=2, seed=0, lr=8e-4, kind_weight=5.0)
    finally:  # later tests keep their own settings
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    flag, zero, strong = (unet_of(tmp_path / n) for n in ("flag", "zero", "strong"))
    assert all(torch.equal(flag[k], zero[k]) for k in zero)
    assert any(not torch.equal(zero[k], strong[k]) for k in zero)


def test_kind_targets_name_the_kind_under_each_latent_pixel():
    from loldu_sd.toyworld.pretrain import kind_targets

    scene = W.Scene((W.Thing("star", "red", (), (32, 32), 17.0),))
    targets = kind_targets([scene], 16)
    assert targets.shape == (1, 1 + len(W.KINDS), 16, 16) and np.allclose(targets.sum(1).numpy(), 1.0)
    assert targets[0, 1 + W.KINDS.index("star"), 8, 8] == 1.0 and targets[0, 0, 0, 0] == 1.0
    edge = (targets[0, 0] > 0) & (targets[0, 0] < 1)  # latent pixels the outline crosses share star and background
    assert edge.sum() > 8 and np.allclose(targets[0, 1 + W.KINDS.index("star")][edge] + targets[0, 0][edge], 1.0)


def test_blurred_latents_keep_a_flat_field_and_spread_a_spike_evenly():
    import torch

    from loldu_sd.toyworld.pretrain import gaussian_blur

    flat = torch.full((1, 8, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)
    spike = torch.zeros(1, 1, 16, 16)
    spike[..., 8, 8] = 1.0
    out = gaussian_blur(spike, 1.0)
    assert out.sum().item() == pytest.approx(1.0) and out[0, 0, 8, 8] < 0.2
    assert out[0, 0, 8, 7] == out[0, 0, 8, 9] == out[0, 0, 7, 8] == out[0, 0, 9, 8]


def test_vae_stage_trains_the_kind_head_and_stores_the_latent_scale(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from loldu_sd.toyworld.pretrain import load_kind_head, train_vae

    train_vae(tmp_path, steps=2, batch=2, seed=0)
    state = torch.load(tmp_path / "vae_state.pt", weights_only=True)
    assert state["step"] == 2 and state["kind_head"]["weight"].shape[:2] == (1 + len(W.KINDS), 8)
    head = load_kind_head(tmp_path, 8)  # the generator stage reads the head from its own file
    assert torch.equal(head.weight, state["kind_head"]["weight"]) and not head.weight.requires_grad
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.latent_channels == 8 and vae.config.scaling_factor != 0.18215


def test_object_weighted_loss_counts_shape_edges_more_than_flat_background():
    import torch

    from loldu_sd.toyworld.pretrain import object_weighted_mse

    flat = torch.zeros(1, 3, 64, 64)
    assert object_weighted_mse(torch.ones(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), flat) == pytest.approx(1.0)
    scene = flat.clone()
    scene[:, :, 24:40, 24:40] = 1.0  # a square in the middle
    err_on_edge, err_in_corner = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    err_on_edge[..., 8, 5], err_in_corner[..., 0, 0] = 1.0, 1.0  # latent column 5 holds the left edge
    assert object_weighted_mse(err_on_edge, 0 * err_on_edge, scene) > 2 * object_weighted_mse(
        err_in_corner, 0 * err_in_corner, scene)


def test_x0_from_v_matches_the_schedulers_own_estimate():
    import torch

    from loldu_sd.toyworld.models import train_scheduler
    from loldu_sd.toyworld.pretrain import predicted_x0

    sched, g = train_scheduler(), torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, 16, 16, generator=g), torch.randn(3, 8, 16, 16, generator=g)
    t = torch.tensor([10, 500, 990])
    noisy, v = sched.add_noise(x0, noise, t), sched.get_velocity(x0, noise, t)
    assert torch.allclose(predicted_x0(sched, noisy, v, t), x0, atol=1e-4)
    sched.set_timesteps(1000)
    step = sched.step(v[1:2], 500, noisy[1:2], generator=g)  # diffusers' own v -> x0 conversion, clipped to [-1, 1]
    ours = predicted_x0(sched, noisy[1:2], v[1:2], t[1:2]).clamp(-1, 1)
    assert torch.allclose(ours, step.pred_original_sample, atol=1e-4)


def test_kind_agreement_is_lowest_when_the_estimate_names_the_true_latents_kinds():
    import torch

    from loldu_sd.toyworld.pretrain import kind_agreement

    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 1 + len(W.KINDS), 1)
    z = 3 * torch.randn(2, 8, 16, 16)
    right = kind_agreement(head, z, z)
    assert right < kind_agreement(head, z.flip(-1), z) and right < kind_agreement(head, torch.zeros_like(z), z)


# ---- the committed pipeline --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_committed_pipeline_loads_offline_small_and_draws_what_it_is_told(judges):
    from diffusers import StableDiffusionPipeline

    from eval.toyworld import attribute_hits, generate, probe_prompts, prompt_of
    from loldu_sd.toyworld import ASSETS_DIR, MARKER, PIPELINE_DIR, load_pipeline

    pipe = load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and (PIPELINE_DIR / MARKER).is_file()
    stored = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*.safetensors"))
    assert stored <= 20e6, stored  # pipeline and judges, fp16
    triples = probe_prompts(held_out=False, n=16, seed=3)
    hits = {k: sum(v) for k, v in attribute_hits(judges, generate(pipe, [prompt_of(*t) for t in triples]),
                                                 triples).items()}
    # chance: 2 of 16 for each attribute; measured 15, 14 and 7 (docs/toyworld.md), less room for other CPUs' rounding
    assert hits["background"] >= 13 and hits["colour"] >= 12 and hits["kind"] >= 6, hits


@pytest.mark.slow
def test_eval_sanity_writes_the_judges_table_attribute_and_per_kind_accuracy(tmp_path):
    import json

    from eval.__main__ import main

    assert main(["sanity", "--samples", "1", "--probe_prompts", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sanity.json").read_text())
    assert [r["concept"] for r in result["sanity"]] == list(C.CONCEPTS)
    assert [(r["images"], r["pairs"]) for r in result["attribute_accuracy"]] == [
        ("rendered", "seen"), ("base model", "seen"), ("rendered", "held-out"), ("base model", "held-out")]
    assert [r["kind"] for r in result["kind_accuracy"]] == list(W.KINDS)
    assert sum(r["n"] for r in result["kind_accuracy"]) == 8  # 4 seen and 4 held-out prompts
    assert result["eye_labels"]["n"] == 96 and (tmp_path / "samples.png").is_file()
