"""`Scorer`: DINO, CLIP-I and CLIP-T of generated images against a subject's reference photos (DreamBooth's metrics).

Backbones (loaded lazily, on first use):
  DINO  `dino_vits16` = timm `vit_small_patch16_224.dino`: the DINO ViT-S/16 the DreamBooth paper uses. timm (which
        open_clip_torch already depends on) rather than transformers because its ViT keeps the original DINO layout,
        so the authors' own `dino_deitsmall16_pretrain.pth` loads as a local file unchanged, and the embedding is the
        same final-norm CLS token that the DINO hub model returns. Preprocessing as DINO's evaluation code: resize
        to 256 (bicubic), centre-crop 224, ImageNet mean/std. Any other timm name also works (e.g. a DINOv2).
  CLIP  open_clip `ViT-B-32` with `openai` weights (QuickGELU set as those weights need), open_clip's own transform.
  `random-tiny` for either: a tiny seeded model with random weights, built locally, for offline tests only:
        its numbers mean nothing.
Or inject embedding callables (list of PIL images -> [N, D], list of str -> [N, D]) to run with anything offline.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from loldu_sd.images import IMAGE_EXTENSIONS, ImageReadError, read_folder, to_rgb

from .metrics import pairwise_similarity, resolve_variant, text_image_similarity
from .prompts import clip_t_prompt

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_MODELS = {"dino_vits16": "vit_small_patch16_224.dino"}  # short name -> timm name
RANDOM_TINY = "random-tiny"
NOT_MEANINGFUL = "random-weight backbones: these numbers test the code path and mean nothing"
ImageFn = Callable[[list], torch.Tensor]
TextFn = Callable[[list], torch.Tensor]


class BackboneUnavailableError(RuntimeError):
    """A scoring backbone could not be loaded (typically: no internet and no local weights)."""


def load_images(directory: str | Path) -> tuple[list[Image.Image], list[Path]]:
    """RGB images of a folder in sorted filename order, with their paths (loldu_sd.images.read_folder).

    Files with other extensions are ignored; unreadable image files are skipped with a warning naming each.
    """
    try:
        found, notes = read_folder(directory, IMAGE_EXTENSIONS)
    except ImageReadError as e:
        raise ValueError(f"image folder {e} (extensions {', '.join(IMAGE_EXTENSIONS)})") from None
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return [im for _, im in found], [p for p, _ in found]


def dino_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """DINO's eval preprocessing: resize to 256/224 x size (bicubic), centre-crop size, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def _hub_file(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, "model.safetensors")
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):  # offline and not cached: no point asking for another file
            raise
        return hf_hub_download(repo_id, "pytorch_model.bin")  # older timm repos


def build_dino(name: str = "dino_vits16", weights: str | Path | None = None, seed: int = 0):
    """(model, transform) for a DINO backbone: a short name, a timm name, or "random-tiny"."""
    import timm

    if name == RANDOM_TINY:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, embed_dim=32,
                                      depth=2, num_heads=2)
        return model.eval(), dino_transform(224)
    arch = DINO_MODELS.get(name, name)
    cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch.split(".")[0]) else None
    try:
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} not found")
        if cfg is None:
            raise ValueError(f"timm has no pretrained model '{arch}'")
        file = str(weights) if weights is not None else _hub_file(cfg.hf_hub_id)
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file), num_classes=0)
    except Exception as e:
        hub = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg is not None and cfg.hf_hub_id else "its Hub repo"
        why = f"{type(e).__name__}: {str(e).rstrip('.')}"
        orig = " or DINO's original dino_deitsmall16_pretrain.pth" if arch == DINO_MODELS["dino_vits16"] else ""
        raise BackboneUnavailableError(
            f"cannot load DINO backbone '{name}' (timm '{arch}'): {why}. To run offline give local "
            f"weights: --dino_weights PATH (Python: Scorer(dino_weights=PATH)), e.g. model.safetensors from {hub}"
            f"{orig}; or fill the Hugging Face cache (HF_HOME) on a machine with internet.") from e
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model.eval(), dino_transform(size, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])


def build_clip(name: str = "ViT-B-32", pretrained: str = "openai", weights: str | Path | None = None, seed: int = 0):
    """(model, transform, tokenizer) for an open_clip backbone, or "random-tiny"."""
    import open_clip

    if name == RANDOM_TINY:
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = open_clip.CLIP(32, CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=32, image_size=224),
                                   CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
        transform = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                              std=open_clip.OPENAI_DATASET_STD)
        return model.eval(), transform, open_clip.get_tokenizer("ViT-B-32")  # bundled BPE vocab: offline
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    try:
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} not found")
        # OpenAI's weights were trained with QuickGELU; open_clip 3 only warns if the config disagrees, so set it
        model, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=str(weights) if weights is not None else pretrained,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"), image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"))
    except Exception as e:
        hub = f"https://huggingface.co/{tag_cfg['hf_hub'].rstrip('/')}" if tag_cfg.get("hf_hub") else "its Hub repo"
        why = f"{type(e).__name__}: {str(e).rstrip('.')}"
        raise BackboneUnavailableError(
            f"cannot load CLIP backbone '{name}' (open_clip, pretrained '{pretrained}'): {why}. "
            f"To run offline give local weights: --clip_weights PATH (Python: Scorer(clip_weights=PATH)), e.g. "
            f"open_clip_model.safetensors from {hub}; or fill the Hugging Face cache (HF_HOME) on a machine with "
            f"internet.") from e
    return model.eval(), transform, open_clip.get_tokenizer(name)


@dataclass
class ImageEmbeddings:
    """DINO and CLIP image embeddings of one image set ([N, D] each), to reuse across scores."""

    dino: torch.Tensor
    clip: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return self.dino.shape[0]


class Scorer:
    """DreamBooth metrics with swappable backbones; see the module docstring for the choices."""

    def __init__(self, dino_model: str = "dino_vits16", clip_model: str = "ViT-B-32", clip_pretrained: str = "openai",
                 dino_weights: str | Path | None = None, clip_weights: str | Path | None = None, *,
                 dino_embed_fn: ImageFn | None = None, clip_image_embed_fn: ImageFn | None = None,
                 clip_text_embed_fn: TextFn | None = None, variant: str = "cosine", device: str | None = None,
                 batch_size: int = 32, seed: int = 0, progress: bool = False):
        if (clip_image_embed_fn is None) != (clip_text_embed_fn is None):
            raise ValueError("inject clip_image_embed_fn and clip_text_embed_fn together (one shared CLIP space)")
        self.dino_model, self.dino_weights, self.dino_embed_fn = dino_model, dino_weights, dino_embed_fn
        self.clip_model, self.clip_pretrained, self.clip_weights = clip_model, clip_pretrained, clip_weights
        self.clip_image_embed_fn, self.clip_text_embed_fn = clip_image_embed_fn, clip_text_embed_fn
        self.variant = resolve_variant(variant)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size, self.seed, self.progress = batch_size, seed, progress
        self._dino = self._clip = None

    @classmethod
    def random_tiny(cls, seed: int = 0, **kwargs) -> "Scorer":
        """A Scorer on tiny random-weight backbones: offline and fast, numbers not meaningful."""
        return cls(RANDOM_TINY, RANDOM_TINY, seed=seed, **kwargs)

    def describe(self) -> dict:
        """The backbones in use, for reports (with a warning flag for random-weight ones)."""
        dino = self.dino_model + (f" ({self.dino_weights})" if self.dino_weights else "")
        clip = f"{self.clip_model}/{self.clip_pretrained}" + (f" ({self.clip_weights})" if self.clip_weights else "")
        named = self.dino_model.startswith("toyworld")  # the toy world's judges are injected under their own names
        dino = "injected" if self.dino_embed_fn and not named else dino
        clip = self.clip_model if named else "injected" if self.clip_image_embed_fn else \
            RANDOM_TINY if self.clip_model == RANDOM_TINY else clip
        out = {"dino_backbone": dino, "clip_backbone": clip}
        if RANDOM_TINY in (dino, clip):
            out["note"] = NOT_MEANINGFUL
        return out

    # ---- embeddings -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _batched(self, encode, transform, images: Sequence[Image.Image], desc: str) -> torch.Tensor:
        from tqdm.auto import tqdm

        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc=desc, disable=not self.progress, leave=False):
            x = torch.stack([transform(to_rgb(im)) for im in images[i:i + self.batch_size]])
            out.append(encode(x.to(self.device)).float().cpu())
        return torch.cat(out)

    def embed_dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DINO embeddings [N, D] (CLS token)."""
        if self.dino_embed_fn is not None:
            return torch.as_tensor(self.dino_embed_fn(list(images)))
        if self._dino is None:
            model, transform = build_dino(self.dino_model, self.dino_weights, self.seed)
            self._dino = model.to(self.device), transform
        model, transform = self._dino
        return self._batched(model, transform, images, "DINO")

    def _load_clip(self):
        if self._clip is None:
            model, transform, tok = build_clip(self.clip_model, self.clip_pretrained, self.clip_weights, self.seed)
            self._clip = model.to(self.device), transform, tok
        return self._clip

    def embed_clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings [N, D]."""
        if self.clip_image_embed_fn is not None:
            return torch.as_tensor(self.clip_image_embed_fn(list(images)))
        model, transform, _ = self._load_clip()
        return self._batched(model.encode_image, transform, images, "CLIP image")

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings [N, D]."""
        if self.clip_text_embed_fn is not None:
            return torch.as_tensor(self.clip_text_embed_fn(list(texts)))
        model, _, tokenizer = self._load_clip()
        return torch.cat([model.encode_text(tokenizer(list(texts[i:i + self.batch_size])).to(self.device)).float().cpu()
                          for i in range(0, len(texts), self.batch_size)])

    def embed_images(self, images, names: Sequence[str] | None = None) -> ImageEmbeddings:
        """Both image embeddings of a folder path or a list of PIL images (or pass an ImageEmbeddings through)."""
        if isinstance(images, ImageEmbeddings):
            return images
        if isinstance(images, (str, Path)):
            images, paths = load_images(images)
            names = [p.name for p in paths]
        images = list(images)
        if not images:
            raise ValueError("no images to score")
        names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
        emb = ImageEmbeddings(self.embed_dino(images), self.embed_clip_images(images), names)
        if not emb.dino.shape[0] == emb.clip.shape[0] == len(images):
            raise ValueError(f"embedding functions returned {emb.dino.shape[0]} / {emb.clip.shape[0]} rows for "
                             f"{len(images)} images")
        return emb

    # ---- scores -----------------------------------------------------------------------------------------------
    def score(self, generated, reference, prompts: str | Sequence[str] | None = None, *,
              unique_token: str | None = "sks", identifier: str = "drop") -> dict:
        """DINO, CLIP-I (generated vs reference) and CLIP-T (generated vs its prompt), plus per-image values.

        generated / reference: a folder, a list of PIL images, or ImageEmbeddings. prompts: one per generated image
        (or one for all); the CLIP-T text is `clip_t_prompt(prompt, unique_token, identifier)`.
        """
        gen, ref = self.embed_images(generated), self.embed_images(reference)
        dino = pairwise_similarity(gen.dino, ref.dino, self.variant)
        clip_i = pairwise_similarity(gen.clip, ref.clip, self.variant)
        result = {"dino": dino.mean, "clip_i": clip_i.mean, "clip_t": None, "n_generated": len(gen),
                  "n_reference": len(ref), "variant": self.variant, "identifier": identifier,
                  "unique_token": unique_token, **self.describe()}
        rows = [{"image": n, "dino": d, "clip_i": c} for n, d, c in
                zip(gen.names, dino.per_item.tolist(), clip_i.per_item.tolist())]
        if prompts is not None:
            prompts = [prompts] * len(gen) if isinstance(prompts, str) else list(prompts)
            if len(prompts) != len(gen):
                raise ValueError(f"got {len(prompts)} prompts for {len(gen)} generated images; give one per image")
            texts = [clip_t_prompt(p, unique_token, identifier) for p in prompts]
            uniq = sorted(set(texts))  # 25 prompts x 4 images: encode each text once
            emb = self.embed_texts(uniq)
            clip_t = text_image_similarity(emb[[uniq.index(t) for t in texts]], gen.clip, self.variant)
            result["clip_t"] = clip_t.mean
            for row, p, t, v in zip(rows, prompts, texts, clip_t.per_item.tolist()):
                row.update(prompt=p, clip_t_text=t, clip_t=v)
        result["per_image"] = rows
        return result

    def score_real(self, reference) -> dict:
        """The "real images" row: DINO and CLIP-I between different real photos of one subject (no self-pairs)."""
        ref = self.embed_images(reference)
        return {"dino": pairwise_similarity(ref.dino, ref.dino, self.variant, exclude_self=True).mean,
                "clip_i": pairwise_similarity(ref.clip, ref.clip, self.variant, exclude_self=True).mean,
                "clip_t": None, "n_generated": len(ref), "n_reference": len(ref), "variant": self.variant,
                **self.describe()}


# ---- report helpers (shared by the CLI subcommands) -------------------------------------------------------------
def fmt(v) -> str:
    """A score for a table: 3 decimals, or "n/a"."""
    return "n/a" if v is None else f"{v:.3f}"


def markdown_table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    """A GitHub markdown table of rows (floats to 3 decimals)."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) if isinstance(r.get(c), float) or r.get(c) is None
                                        else str(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> Path:
    """Write obj as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Write rows as CSV with the given columns (missing values empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


# ---- command-line options shared by `python -m eval score` and `python -m eval dreambooth` ---------------------
def add_scorer_arguments(p) -> None:
    """Backbone, variant and CLIP-T text options."""
    g = p.add_argument_group("scoring")
    g.add_argument("--backbones", choices=["pretrained", "toyworld", RANDOM_TINY], default="pretrained",
                   help="'toyworld': the embedded toy world's judges (trained here; for toy-world images). "
                        f"'{RANDOM_TINY}': tiny random-weight DINO and CLIP built locally (offline tests; numbers "
                        "NOT meaningful). Both override --dino_model/--clip_model.")
    g.add_argument("--dino_model", default="dino_vits16",
                   help=f"dino_vits16 (timm {DINO_MODELS['dino_vits16']}), any timm model name, or {RANDOM_TINY}")
    g.add_argument("--dino_weights", default=None, help="Local DINO weights file (offline use).")
    g.add_argument("--clip_model", default="ViT-B-32", help=f"open_clip model name, or {RANDOM_TINY}")
    g.add_argument("--clip_pretrained", default="openai", help="open_clip pretrained tag (what the weights are).")
    g.add_argument("--clip_weights", default=None, help="Local file holding the --clip_pretrained weights.")
    g.add_argument("--variant", default="cosine", choices=["cosine", "cosine01", "cos01", "paper_scorer"],
                   help="cosine: raw cosine (default). cosine01 (= cos01, paper_scorer): (cos+1)/2 as the LoLDU "
                        "authors' scorer.")
    g.add_argument("--identifier", choices=["drop", "keep"], default="drop",
                   help="CLIP-T text: drop the unique token ('a sks dog' -> 'a dog', default) or keep the prompt.")
    g.add_argument("--batch_size", type=int, default=32, help="Images per backbone forward.")
    g.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")


def toyworld_scorer(judges_dir: str | Path | None = None, **kwargs) -> Scorer:
    """A Scorer whose DINO is the toy world's instance encoder and whose CLIP is its image-text model."""
    from loldu_sd.toyworld import JUDGES_DIR
    from loldu_sd.toyworld.judges import load_judges

    judges = load_judges(JUDGES_DIR if judges_dir is None else judges_dir)
    return Scorer("toyworld-instance", "toyworld-image-text", dino_embed_fn=judges.embed_instances,
                  clip_image_embed_fn=judges.embed_images, clip_text_embed_fn=judges.embed_texts, **kwargs)


def scorer_from_args(args) -> Scorer:
    """A Scorer from add_scorer_arguments' options."""
    if args.backbones == "toyworld":
        return toyworld_scorer(variant=args.variant, device="cpu", batch_size=args.batch_size)
    tiny = args.backbones == RANDOM_TINY
    return Scorer(RANDOM_TINY if tiny else args.dino_model, RANDOM_TINY if tiny else args.clip_model,
                  args.clip_pretrained, args.dino_weights, args.clip_weights, variant=args.variant,
                  device=args.device, batch_size=args.batch_size, progress=True)
