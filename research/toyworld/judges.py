"""Stage `judges`: train the toy world's instance encoder and image-text model (`loldu_sd.toyworld.judges`).

The image-text judge has a text tower of its own, trained for the judge alone: the generator conditions on a frozen
copy of its own (research/toyworld/generator.py), so the judge can be retrained, and its kind captions pushed apart,
without moving the generator.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from loldu_sd.toyworld.concepts import is_held_out
from loldu_sd.toyworld.judges import (IMAGE_TEXT_FILE, INSTANCE_FILE, ConvEncoder, ImageText, Judges, load_judges,
                                      new_image_text, to_tensor)
from loldu_sd.toyworld.models import toy_tokenizer
from loldu_sd.toyworld.world import COLOURS, DECORATIONS, KINDS, RICH_DECORATIONS, Scene, caption, render, sample_scene

from .common import Checkpointer, Log, gaussian_blur, lr_at, resume_step

# the instance encoder's cosine scale, and how sharply its targets fall with each attribute two instances do not share
INSTANCE_SCALE, INSTANCE_SHARPNESS = 10.0, 9.0
IMAGE_TOWER_LR = 5e-4  # a fine-tune of a trained tower: a quarter of the judges' peak rate
# captions that differ only in the kind must stay this far apart (cosine): at 0.97 the probe confused stars and crosses
KIND_SEPARATION, SEPARATION_WEIGHT = 0.8, 1.0


def _save(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().half().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def sample_instance(rng: random.Random) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """An instance from the judges' wider world: up to two decorations of any kind, never a held-out concept."""
    while True:
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        if not is_held_out(kind, colour, decorations := _decorations(rng, colour)):
            return kind, colour, decorations


def _decorations(rng: random.Random, colour: str) -> tuple[tuple[str, str], ...]:
    names = rng.sample(DECORATIONS + RICH_DECORATIONS, k=rng.choice((0, 1, 1, 2, 2)))
    return tuple((n, rng.choice([c for c in COLOURS if c != colour])) for n in names)


def instance_variants(rng: random.Random) -> list[tuple]:
    """An instance and three that differ from it in one respect each: the kind, the colour, the decorations."""
    kind, colour, decorations = base = sample_instance(rng)
    taken = {colour} | {c for _, c in decorations}
    changes = [lambda: (rng.choice([k for k in KINDS if k != kind]), colour, decorations),
               lambda: (kind, rng.choice([c for c in COLOURS if c not in taken]), decorations),
               lambda: (kind, colour, _decorations(rng, colour))]
    variants = [base]
    for change in changes:
        while (v := change()) == base or is_held_out(*v):
            pass
        variants.append(v)
    return variants


def instance_similarity(a: tuple, b: tuple) -> float:
    """What two instances share, in [0, 1]: the kind, the colour and the decorations count a third each."""
    da, db = set(a[2]), set(b[2])
    decorations = 1.0 if da == db else len(da & db) / len(da | db)
    return ((a[0] == b[0]) + (a[1] == b[1]) + decorations) / 3


def graded_targets(objs: list[tuple], sharpness: float) -> torch.Tensor:
    """Contrastive targets that rank partial matches: row i puts weight exp(sharpness * (similarity - 1)) on j."""
    sim = torch.tensor([[instance_similarity(a, b) for b in objs] for a in objs])
    weights = torch.exp(sharpness * (sim - 1))
    return weights / weights.sum(dim=1, keepdim=True)


def photo_jitter(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Blur half the images (generated images are soft) and scale each one's contrast and brightness a little."""
    out = []
    for im in x:
        if rng.random() < 0.5:
            im = gaussian_blur(im[None], rng.uniform(0.5, 1.2))[0]
        out.append((im * rng.uniform(0.8, 1.1) + rng.uniform(-0.1, 0.1)).clamp(-1, 1))
    return torch.stack(out)


def _soft_targets(rows: list, cols: list) -> torch.Tensor:
    same = torch.tensor([[a == b for b in cols] for a in rows], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)


def _contrastive(a: torch.Tensor, b: torch.Tensor, keys: list, scale: torch.Tensor | float,
                 extra_keys: list = ()) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets (equal keys are all positives); rows of b past len(keys) are extra
    negatives for the a -> b direction only (`extra_keys` says what they are, in case one equals a real key)."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    n = len(keys)
    forward = F.cross_entropy(logits, _soft_targets(keys, list(keys) + list(extra_keys)))
    return 0.5 * (forward + F.cross_entropy(logits[:, :n].T, _soft_targets(keys, keys)))


def kind_swapped(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with another kind of object: a caption that is wrong only in the shape word."""
    kind = rng.choice([k for k in KINDS if k != scene.things[0].kind])
    return replace(scene, things=tuple(replace(t, kind=kind) for t in scene.things))


def _train_loop(model: nn.Module, steps: int, loss_fn, log_path: Path, lr: float = 2e-3,
                resume: bool = False) -> None:
    """AdamW with warm-up and cosine decay, resumable from <log_path's stem>_state.safetensors."""
    opt, log = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01), Log(log_path)
    path = log_path.with_name(log_path.stem.replace("_loss", "") + "_state.safetensors")
    start, saver = resume_step(path, {"model": model}, opt, resume), Checkpointer(path, {"model": model}, opt)
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.add(step, loss.item())
        saver.maybe_save(step, steps)


def train_judges(out: Path, steps: int, seed: int, batch: int = 48, image_tower_steps: int = 0,
                 device: str = "cpu", resume: bool = False) -> Judges:
    """Train each judge whose weights are not in <out>/judges yet, then load both.

    Instance encoder: `batch` objects x 2 views, in fours: an instance and three variants that differ from it in the
    kind, the colour or the decorations, so that every batch holds partial matches. Image-text model: 2 x `batch`
    captioned scenes, each with a kind-swapped caption as a hard negative (colour and background words are easy; the
    shape word is not), and captions that differ only in the kind held apart. Then, once, `image_tower_steps` of
    `train_image_tower`.
    """
    tokenizer, folder = toy_tokenizer(), out / "judges"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / INSTANCE_FILE).is_file():
        torch.manual_seed(seed)
        instance = ConvEncoder().to(device)

        def instance_loss(step: int) -> torch.Tensor:
            rng = random.Random(seed * 1_000_003 + 900_000 + step)
            objs = [v for _ in range(batch // 4) for v in instance_variants(rng)]
            views = [render(sample_scene(rng, obj=o)) for o in objs for _ in range(2)]
            z = instance(photo_jitter(to_tensor(views), rng).to(device)).view(len(objs), 2, -1)
            logits = INSTANCE_SCALE * F.normalize(z[:, 0], dim=-1) @ F.normalize(z[:, 1], dim=-1).T
            targets = graded_targets(objs, INSTANCE_SHARPNESS).to(device)
            return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

        _train_loop(instance, steps, instance_loss, out / "judge_instance_loss.jsonl", resume=resume)
        _save(instance, folder / INSTANCE_FILE)
        _record(folder, "instance_encoder", steps=steps, seed=seed, batch=batch,
                targets=f"graded by shared kind, colour and decorations (sharpness {INSTANCE_SHARPNESS})",
                augment="blur, contrast and brightness")
    if not (folder / IMAGE_TEXT_FILE).is_file():
        torch.manual_seed(seed + 1)
        image_text = new_image_text(tokenizer).to(device)

        def image_text_loss(step: int) -> torch.Tensor:
            rng = random.Random(seed * 1_000_003 + 950_000 + step)
            return _image_text_loss(image_text, tokenizer, rng, batch, separate=True)

        _train_loop(image_text, steps, image_text_loss, out / "judge_image_text_loss.jsonl", resume=resume)
        _save(image_text, folder / IMAGE_TEXT_FILE)
        _record(folder, "image_text", steps=steps, seed=seed, batch=2 * batch, hard_negatives="kind-swapped captions",
                kind_separation=f"cosine <= {KIND_SEPARATION} (weight {SEPARATION_WEIGHT})")
    if image_tower_steps and "image_tower" not in _records(folder):
        train_image_tower(out, image_tower_steps, seed, batch, device, resume)
    return load_judges(folder)


def _image_text_loss(model: ImageText, tokenizer, rng: random.Random, batch: int, soft: bool = False,
                     separate: bool = False) -> torch.Tensor:
    """CLIP's loss on 2 x `batch` captioned scenes, each with a kind-swapped caption as an extra negative (`soft`:
    on generated-looking views of them; `separate`: plus `kind_separation` of each caption from its negative)."""
    device = model.logit_scale.device
    scenes = [sample_scene(rng) for _ in range(2 * batch)]
    captions = [caption(s) for s in scenes]
    negatives = [caption(kind_swapped(s, rng)) for s in scenes]
    ids = tokenizer(captions + negatives, padding="max_length", max_length=32, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    pixels = to_tensor([render(s) for s in scenes])
    img = model.image((generated_look(pixels, rng) if soft else pixels).to(device))
    scale = model.logit_scale.exp().clamp(max=100)
    text = model.encode_text(ids)
    loss = _contrastive(img, text, captions, scale, negatives)
    if separate:
        loss = loss + SEPARATION_WEIGHT * kind_separation(text[:len(scenes)], text[len(scenes):])
    return loss


def kind_separation(texts: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """Squared excess of each caption's cosine to its kind-swapped twin over KIND_SEPARATION.

    Contrastive loss alone left captions that differ only in the kind at cosine 0.97-0.99: near enough that a soft
    image matched a star and a cross caption alike, and the zero-shot kind probe read most generated stars as crosses.
    """
    cos = (F.normalize(texts, dim=-1) * F.normalize(swapped, dim=-1)).sum(-1)
    return F.relu(cos - KIND_SEPARATION).pow(2).mean()


def generated_look(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """`photo_jitter`, and on half the images a colour drift and pixel noise: generated fills are soft and blotchy."""
    x = photo_jitter(x, rng)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    out = []
    for im in x:
        if rng.random() < 0.5:
            cells = rng.choice((4, 8, 16))  # blotches from a quarter of the image down to an object's stroke
            drift = F.interpolate(torch.randn(1, 3, cells, cells, generator=g), size=im.shape[-2:], mode="bilinear")
            im = im + rng.uniform(0, 0.3) * drift[0] + rng.uniform(0, 0.05) * torch.randn(im.shape, generator=g)
        out.append(im.clamp(-1, 1))
    return torch.stack(out)


def train_image_tower(out: Path, steps: int, seed: int, batch: int = 48, device: str = "cpu",
                      resume: bool = False) -> None:
    """Fine-tune the image-text judge's image tower on generated-looking views; its text tower stays frozen.

    A tower trained on crisp renders alone misreads soft, blotchy shapes (finding 17 of docs/toyworld-research.md).
    The text tower, its projection and the scale keep the caption geometry (and kind separation) they were trained to.
    """
    folder = out / "judges"
    judges = load_judges(folder)
    model, tokenizer = judges.image_text.to(device).train().requires_grad_(False), judges.tokenizer
    model.image.requires_grad_(True)
    torch.manual_seed(seed + 2)

    def loss(step: int) -> torch.Tensor:
        return _image_text_loss(model, tokenizer, random.Random(seed * 1_000_003 + 970_000 + step), batch, soft=True)

    _train_loop(model.image, steps, loss, out / "judge_image_tower_loss.jsonl", lr=IMAGE_TOWER_LR, resume=resume)
    _save(model, folder / IMAGE_TEXT_FILE)
    _record(folder, "image_tower", steps=steps, seed=seed, batch=2 * batch, lr=IMAGE_TOWER_LR, text_tower="frozen",
            augment="blur, contrast and brightness, colour drift, pixel noise")


def _record(folder: Path, judge: str, **settings) -> None:
    """Add one judge's training settings to <folder>/training.json (each judge is trained once, on its own)."""
    record = _records(folder)
    record[judge] = settings
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def _records(folder: Path) -> dict:
    """<folder>/training.json: each judge's (and the image tower's) training settings; empty if none yet."""
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}
