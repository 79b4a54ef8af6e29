"""The toy world's judges: what DINO and CLIP are to Stable Diffusion, trained here on the toy world.

  instance encoder   a small CNN trained contrastively to tell *instances* apart: two photos of the same object
                     (kind, colour, decorations) on other backgrounds, positions and sizes are positives; an object
                     that shares some of those attributes is a partial match, graded by how many it shares, so the
                     shape counts as much as the colour. Views are blurred and their contrast jittered, as DINO's
                     are. It sees a wider world than the generator (up to two decorations, two-tone, checkers,
                     eyes), as DINO saw more than dogs, but never the held-out concepts themselves. The DINO analogue.
  image-text model   a CNN image tower and a CLIPTextModel text tower trained with CLIP's contrastive loss on
                     captioned scenes. Its image tower is the CLIP-I analogue, image-text cosine the CLIP-T analogue.

    judges = load_judges("assets/toyworld/judges")
    judges.embed_instances(images), judges.embed_images(images), judges.embed_texts(prompts)   # [N, 128] each
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .concepts import is_held_out
from .models import toy_tokenizer
from .world import COLOURS, DECORATIONS, KINDS, RICH_DECORATIONS, Scene, caption, render, sample_scene

EMBED_DIM = 128
INSTANCE_FILE, IMAGE_TEXT_FILE = "instance_encoder.safetensors", "image_text.safetensors"
# the instance encoder's cosine scale, and how sharply its targets fall with each attribute two instances do not share
INSTANCE_SCALE, INSTANCE_SHARPNESS = 10.0, 9.0
IMAGE_TOWER_LR = 5e-4  # a fine-tune of a trained tower: a quarter of the judges' peak rate


class ConvEncoder(nn.Module):
    """64x64 RGB -> EMBED_DIM: a stride-2 stem, three stride-2 conv stages (GroupNorm, SiLU), average pool, linear."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128), dim: int = EMBED_DIM):
        super().__init__()
        # a stride-2 stem: 32x32 feature maps keep 2-pixel details of a 64x64 image at a quarter of the cost
        layers, c = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.GroupNorm(8, widths[0]), nn.SiLU()], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body, self.head = nn.Sequential(*layers), nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class ImageText(nn.Module):
    """CLIP in miniature: a ConvEncoder image tower, a CLIPTextModel text tower, a projection and a learnt scale."""

    def __init__(self, vocab_size: int, bos: int, eos: int, pad: int):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.image = ConvEncoder()
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32, bos_token_id=bos,
                                eos_token_id=eos, pad_token_id=pad)
        self.text = CLIPTextModel(config)
        self.text_proj = nn.Linear(128, EMBED_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(input_ids).pooler_output)


def to_tensor(images) -> torch.Tensor:
    """PIL images (any size or mode) -> [N, 3, 64, 64] in [-1, 1]."""
    from PIL import Image

    arr = [np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
           for im in images]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2) / 127.5 - 1.0


@dataclass
class Judges:
    """The two trained judges with the tokenizer, as embedding functions (lists in, L2-normalised [N, D] out)."""

    instance: ConvEncoder
    image_text: ImageText
    tokenizer: object

    @torch.no_grad()
    def embed_instances(self, images) -> torch.Tensor:
        return F.normalize(self.instance(to_tensor(images)).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        return F.normalize(self.image_text.image(to_tensor(images)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=32, truncation=True,
                             return_tensors="pt").input_ids
        return F.normalize(self.image_text.encode_text(ids).float(), dim=-1)


def new_image_text(tokenizer) -> ImageText:
    """An untrained ImageText model for the toy tokenizer."""
    return ImageText(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def load_judges(folder: str | Path) -> Judges:
    """Load both judges from a folder written by `train_judges` (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in (INSTANCE_FILE, IMAGE_TEXT_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"toy-world judges: {', '.join(missing)} not found in {folder}")
    tokenizer = toy_tokenizer()
    instance, image_text = ConvEncoder(), new_image_text(tokenizer)
    instance.load_state_dict({k: v.float() for k, v in load_file(folder / INSTANCE_FILE).items()})
    image_text.load_state_dict({k: v.float() for k, v in load_file(folder / IMAGE_TEXT_FILE).items()})
    return Judges(instance.eval(), image_text.eval(), tokenizer)


def _save(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, path)


# ---- training ------------------------------------------------------------------------------------------------------
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
    from .pretrain import gaussian_blur

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


def _train_loop(model: nn.Module, steps: int, loss_fn, log_path: Path, lr: float = 2e-3) -> None:
    from .pretrain import Log, lr_at

    opt, log = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01), Log(log_path)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.add(step, loss.item())


def train_judges(out: Path, steps: int, seed: int, batch: int = 48, image_tower_steps: int = 0) -> Judges:
    """Train each judge whose weights are not in <out>/judges yet, then load both.

    Instance encoder: `batch` objects x 2 views, in fours: an instance and three variants that differ from it in the
    kind, the colour or the decorations, so that every batch holds partial matches. Image-text model: 2 x `batch`
    captioned scenes, each with a kind-swapped caption as a hard negative (colour and background words are easy; the
    shape word is not). Then, once, `image_tower_steps` of `train_image_tower`.
    """
    tokenizer, folder = toy_tokenizer(), out / "judges"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / INSTANCE_FILE).is_file():
        torch.manual_seed(seed)
        instance = ConvEncoder()

        def instance_loss(step: int) -> torch.Tensor:
            rng = random.Random(seed * 1_000_003 + 900_000 + step)
            objs = [v for _ in range(batch // 4) for v in instance_variants(rng)]
            views = [render(sample_scene(rng, obj=o)) for o in objs for _ in range(2)]
            z = instance(photo_jitter(to_tensor(views), rng)).view(len(objs), 2, -1)
            logits = INSTANCE_SCALE * F.normalize(z[:, 0], dim=-1) @ F.normalize(z[:, 1], dim=-1).T
            targets = graded_targets(objs, INSTANCE_SHARPNESS)
            return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

        _train_loop(instance, steps, instance_loss, out / "judge_instance_loss.jsonl")
        _save(instance, folder / INSTANCE_FILE)
        _record(folder, "instance_encoder", steps=steps, seed=seed, batch=batch,
                targets=f"graded by shared kind, colour and decorations (sharpness {INSTANCE_SHARPNESS})",
                augment="blur, contrast and brightness")
    if not (folder / IMAGE_TEXT_FILE).is_file():
        torch.manual_seed(seed + 1)
        image_text = new_image_text(tokenizer)

        def image_text_loss(step: int) -> torch.Tensor:
            return _image_text_loss(image_text, tokenizer, random.Random(seed * 1_000_003 + 950_000 + step), batch)

        _train_loop(image_text, steps, image_text_loss, out / "judge_image_text_loss.jsonl")
        _save(image_text, folder / IMAGE_TEXT_FILE)
        _record(folder, "image_text", steps=steps, seed=seed, batch=2 * batch, hard_negatives="kind-swapped captions")
    if image_tower_steps and "image_tower" not in _records(folder):
        train_image_tower(out, image_tower_steps, seed, batch)
    return load_judges(folder)


def _image_text_loss(model: ImageText, tokenizer, rng: random.Random, batch: int, soft: bool = False) -> torch.Tensor:
    """CLIP's loss on 2 x `batch` captioned scenes, each with a kind-swapped caption as an extra negative (`soft`:
    on generated-looking views of them)."""
    scenes = [sample_scene(rng) for _ in range(2 * batch)]
    captions = [caption(s) for s in scenes]
    negatives = [caption(kind_swapped(s, rng)) for s in scenes]
    ids = tokenizer(captions + negatives, padding="max_length", max_length=32, truncation=True,
                    return_tensors="pt").input_ids
    pixels = to_tensor([render(s) for s in scenes])
    img = model.image(generated_look(pixels, rng) if soft else pixels)
    scale = model.logit_scale.exp().clamp(max=100)
    return _contrastive(img, model.encode_text(ids), captions, scale, negatives)


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


def train_image_tower(out: Path, steps: int, seed: int, batch: int = 48) -> None:
    """Fine-tune the image-text judge's image tower on generated-looking views; its text tower stays frozen.

    A tower trained on crisp renders alone misreads soft, blotchy shapes (finding 17 of docs/toyworld.md). The text
    tower, its projection and the scale stay as they are, because the generator conditions on that tower.
    """
    folder = out / "judges"
    judges = load_judges(folder)
    model, tokenizer = judges.image_text.train().requires_grad_(False), judges.tokenizer
    model.image.requires_grad_(True)
    torch.manual_seed(seed + 2)

    def loss(step: int) -> torch.Tensor:
        return _image_text_loss(model, tokenizer, random.Random(seed * 1_000_003 + 970_000 + step), batch, soft=True)

    _train_loop(model.image, steps, loss, out / "judge_image_tower_loss.jsonl", lr=IMAGE_TOWER_LR)
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
