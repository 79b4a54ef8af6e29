"""eval: metric maths against hand computations, the DreamBooth prompt data, the CLIP-T text rule, the Scorer."""
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from eval.metrics import cosine_matrix, pairwise_similarity, resolve_variant, text_image_similarity
from eval.prompts import (LIVE_PROMPTS, OBJECT_PROMPTS, SUBJECTS, clip_t_prompt, dreambooth_prompts, is_live,
                          subject_class)
from eval.scorer import BackboneUnavailableError, Scorer, build_clip, build_dino, load_images


def cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def lists(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).tolist()


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_pairwise_matches_hand_computation():
    gen, ref = lists(3, 5, 1), lists(4, 5, 2)
    hand = [[cos(g, r) for r in ref] for g in gen]
    s = pairwise_similarity(gen, ref)
    assert s.mean == pytest.approx(sum(map(sum, hand)) / 12, abs=1e-12)
    assert s.per_item.tolist() == pytest.approx([sum(row) / 4 for row in hand], abs=1e-12)
    assert cosine_matrix(gen, ref).tolist() == [pytest.approx(row, abs=1e-12) for row in hand]
    assert float(s) == s.mean and s.variant == "cosine"


def test_pairwise_symmetric_and_scale_invariant():
    gen, ref = torch.tensor(lists(3, 6, 3), dtype=torch.float64), torch.tensor(lists(5, 6, 4), dtype=torch.float64)
    base = pairwise_similarity(gen, ref).mean
    assert pairwise_similarity(ref, gen).mean == pytest.approx(base, abs=1e-12)
    scales = torch.tensor([[0.1], [3.0], [250.0]], dtype=torch.float64)
    assert pairwise_similarity(gen * scales, ref * 7.5).mean == pytest.approx(base, abs=1e-12)
    assert pairwise_similarity(gen.numpy(), ref.float()).mean == pytest.approx(base, abs=1e-6)  # numpy, float32


def test_exclude_self_drops_the_diagonal():
    x = lists(4, 3, 5)
    hand = [cos(x[i], x[j]) for i in range(4) for j in range(4) if i != j]
    assert pairwise_similarity(x, x, exclude_self=True).mean == pytest.approx(sum(hand) / 12, abs=1e-12)
    assert pairwise_similarity(x[:1], x[:1]).mean == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_similarity(x[:1], x[:1], exclude_self=True)


def test_text_image_paired_and_broadcast():
    text, img = lists(3, 4, 6), lists(3, 4, 7)
    hand = [cos(t, i) for t, i in zip(text, img)]
    s = text_image_similarity(text, img)
    assert s.mean == pytest.approx(sum(hand) / 3, abs=1e-12)
    assert s.per_item.tolist() == pytest.approx(hand, abs=1e-12)
    one = text_image_similarity(text[0], img)  # one text for every image
    assert one.mean == pytest.approx(sum(cos(text[0], i) for i in img) / 3, abs=1e-12)
    assert text_image_similarity([text[0]], img).mean == pytest.approx(one.mean, abs=1e-15)
    assert text_image_similarity(np.array(text) * 9, np.array(img) / 4).mean == pytest.approx(s.mean, abs=1e-12)


def test_cosine01_variant_is_half_cos_plus_one():
    gen, ref = lists(2, 3, 8), lists(3, 3, 9)
    raw = pairwise_similarity(gen, ref).mean
    for name in ("cosine01", "cos01", "paper_scorer"):
        s = pairwise_similarity(gen, ref, variant=name)
        assert s.variant == "cosine01" and s.mean == pytest.approx((raw + 1) / 2, abs=1e-12)
    t = text_image_similarity(gen[0], ref[:1], variant="cosine01")
    assert t.mean == pytest.approx((cos(gen[0], ref[0]) + 1) / 2, abs=1e-12)
    assert resolve_variant("cos") == "cosine"
    with pytest.raises(ValueError, match="unknown score variant 'x100'"):
        pairwise_similarity(gen, ref, variant="x100")


def test_metric_bad_input():
    with pytest.raises(ValueError, match="zero-norm"):
        pairwise_similarity([[0.0, 0.0], [1.0, 0.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="sizes differ"):
        pairwise_similarity([[1.0, 0.0]], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="2 text embeddings for 3 images"):
        text_image_similarity(lists(2, 3, 1), lists(3, 3, 2))
    with pytest.raises(ValueError, match="shape"):
        pairwise_similarity(torch.zeros(0, 3), [[1.0, 0.0, 0.0]])


# ---- DreamBooth data and the CLIP-T text rule -------------------------------------------------------------------
def test_dreambooth_protocol_data():
    assert len(SUBJECTS) == 30 and len(OBJECT_PROMPTS) == 25 and len(LIVE_PROMPTS) == 25
    live = sorted(s for s, c in SUBJECTS.items() if is_live(c))
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert subject_class("bear_plushie") == "stuffed animal" and subject_class("dog6") == "dog"
    with pytest.raises(KeyError, match="not a DreamBooth dataset subject"):
        subject_class("unicorn")
    dog = dreambooth_prompts("sks", "dog")
    assert dog[0] == "a sks dog in the jungle" and dog[13] == "a sks dog wearing a black top hat and a monocle"
    assert dog[-1] == "a cube shaped sks dog"
    toy = dreambooth_prompts("sks", "stuffed animal", limit=13)
    assert len(toy) == 13 and toy[-1] == "a sks stuffed animal with the Eiffel Tower in the background"
    assert OBJECT_PROMPTS[:10] == LIVE_PROMPTS[:10] and OBJECT_PROMPTS[20:] == LIVE_PROMPTS[20:]


def test_identifier_option_changes_clip_t_text_as_documented():
    assert clip_t_prompt("a sks dog in the snow") == "a dog in the snow"  # default: drop
    assert clip_t_prompt("a sks dog in the snow", "sks", "keep") == "a sks dog in the snow"
    assert clip_t_prompt("a red sks dog", "sks", "drop") == "a red dog"
    assert clip_t_prompt("a xyz stuffed animal", "xyz") == "a stuffed animal"
    assert clip_t_prompt("sks tasks for a sks dog", "sks") == "tasks for a dog"  # whole words only
    assert clip_t_prompt("a sks dog", None) == "a sks dog"
    with pytest.raises(ValueError, match="identifier must be one of"):
        clip_t_prompt("a sks dog", "sks", "remove")


# ---- Scorer -----------------------------------------------------------------------------------------------------
def noise_images(n, seed, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def pixel_embed(images):
    """A stand-in image embedding: 4x4 thumbnail pixels, centred."""
    return torch.stack([torch.from_numpy(np.asarray(im.resize((4, 4)), dtype=np.float64).ravel() - 127.5)
                        for im in images])


def text_embed(texts):
    """A stand-in text embedding: a random vector seeded by the text."""
    return torch.stack([torch.randn(48, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())),
                                    dtype=torch.float64) for t in texts])


@pytest.fixture
def injected():
    return Scorer(dino_embed_fn=pixel_embed, clip_image_embed_fn=pixel_embed, clip_text_embed_fn=text_embed)


def test_injected_scorer_matches_metric_functions(injected):
    gen, ref = noise_images(3, 1), noise_images(2, 2)
    r = injected.score(gen, ref, ["a sks dog", "a sks dog in the snow", "a red sks dog"])
    expect = pairwise_similarity(pixel_embed(gen), pixel_embed(ref)).mean
    assert r["dino"] == pytest.approx(expect) and r["clip_i"] == pytest.approx(expect)
    t = text_embed(["a dog", "a dog in the snow", "a red dog"])  # identifier dropped by default
    assert r["clip_t"] == pytest.approx(text_image_similarity(t, pixel_embed(gen)).mean)
    assert (r["n_generated"], r["n_reference"], r["variant"], r["dino_backbone"]) == (3, 2, "cosine", "injected")
    assert [row["clip_t_text"] for row in r["per_image"]] == ["a dog", "a dog in the snow", "a red dog"]
    kept = injected.score(gen, ref, "a sks dog", identifier="keep")
    assert kept["per_image"][0]["clip_t_text"] == "a sks dog" and kept["clip_t"] != r["clip_t"]


def test_identical_image_scores_one_with_injected_fns(injected):
    img = noise_images(1, 3)
    r = injected.score(img, img, "a dog")
    assert r["dino"] == pytest.approx(1.0) and r["clip_i"] == pytest.approx(1.0)
    same = Scorer(dino_embed_fn=pixel_embed, clip_image_embed_fn=lambda ims: text_embed(["a dog"] * len(ims)),
                  clip_text_embed_fn=text_embed)
    assert same.score(img, img, "a sks dog")["clip_t"] == pytest.approx(1.0)  # image and text embed alike
    with pytest.raises(ValueError, match="together"):
        Scorer(clip_image_embed_fn=pixel_embed)


@pytest.fixture(scope="module")
def tiny():
    return Scorer.random_tiny(seed=0, device="cpu")


def test_random_tiny_backbones_end_to_end(tiny):
    img, other = noise_images(1, 4, size=300), noise_images(2, 5, size=64)
    r = tiny.score(img, img, "a sks dog")
    assert r["dino"] == pytest.approx(1.0, abs=1e-5) and r["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= r["clip_t"] <= 1 and "mean nothing" in r["note"]
    r2 = tiny.score(other, img + other, ["a sks dog", "a red sks dog"])
    assert r2["dino"] < 1 and r2["clip_i"] < 1 and r2["n_reference"] == 3
    again = Scorer.random_tiny(seed=0, device="cpu").score(other, img + other, ["a sks dog", "a red sks dog"])
    assert again["dino"] == pytest.approx(r2["dino"], abs=1e-6) and again["clip_t"] == pytest.approx(r2["clip_t"])
    real = tiny.score_real(img + other)
    assert real["clip_t"] is None and real["n_reference"] == 3 and real["dino"] < 1


def test_dino_preprocessing_is_resize_256_crop_224():
    model, transform = build_dino("random-tiny")
    assert tuple(transform(noise_images(1, 6, size=500)[0]).shape) == (3, 224, 224)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"] and transform.transforms[0].size == 256
    assert transform.transforms[0].interpolation.value == "bicubic"
    assert transform.transforms[3].mean == (0.485, 0.456, 0.406)


def test_missing_local_weights_error_names_model_and_fix(tmp_path):
    with pytest.raises(BackboneUnavailableError, match=r"'dino_vits16'.*--dino_weights PATH"):
        build_dino("dino_vits16", weights=tmp_path / "nope.pth")
    with pytest.raises(BackboneUnavailableError, match=r"'ViT-B-32'.*openai.*--clip_weights PATH"):
        build_clip("ViT-B-32", "openai", weights=tmp_path / "nope.safetensors")


# ---- image folders ----------------------------------------------------------------------------------------------
def test_load_images_sorted_rgb_and_skips_unreadable(tmp_path):
    for name, im in zip(["b.png", "a.jpg"], noise_images(2, 7)):
        im.save(tmp_path / name)
    Image.new("L", (8, 8)).save(tmp_path / "c.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match=r"broken\.png: skipped, not a readable image"):
        images, paths = load_images(tmp_path)
    assert [p.name for p in paths] == ["a.jpg", "b.png", "c.png"] and all(im.mode == "RGB" for im in images)


def test_load_images_errors(tmp_path):
    with pytest.raises(ValueError, match="missing: no such folder"):
        load_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="is empty"):
        load_images(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"holds no readable image \(1 file\(s\) skipped; x.png: not a readable"):
        load_images(tmp_path)


@pytest.mark.slow  # builds a full-size ViT-S/16 twice (random weights) and writes its 88 MB state dict
def test_dino_from_local_weights_file(tmp_path):
    """--dino_weights: a plain state dict in DINO's own key layout (as dino_deitsmall16_pretrain.pth) loads."""
    import timm

    src = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    torch.save(src.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    scorer = Scorer(dino_weights=tmp_path / "dino_deitsmall16_pretrain.pth", device="cpu")
    img = noise_images(1, 8, size=256)
    x = build_dino("random-tiny")[1](img[0])[None]  # same preprocessing as dino_vits16
    with torch.no_grad():
        assert torch.allclose(scorer.embed_dino(img), src(x), atol=1e-5)
    assert scorer.describe()["dino_backbone"].startswith("dino_vits16 (")
