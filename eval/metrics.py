"""DreamBooth's subject- and prompt-fidelity metrics as pure functions on embeddings (no models here).

    DINO / CLIP-I = mean over all (generated, reference) pairs of cos(gen_i, ref_j)     -> pairwise_similarity
    CLIP-T        = mean over generated images of cos(image_i, text_i)                -> text_image_similarity

Scores are raw cosines in [-1, 1] (variant "cosine", the default): not x100 and not rescaled. The variant
"cosine01" reports (cos + 1) / 2, which is what the LoLDU authors' scorer computed (with DINOv2), so numbers can be
set beside their Table VI; aliases "cos01" and "paper_scorer". The map is affine, so it commutes with the mean.
Embeddings may be torch tensors, numpy arrays or nested lists, shape [N, D] (or [D] for one); the maths runs in
float64 so hand computations match to ~1e-12.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VARIANTS = ("cosine", "cosine01")
_ALIASES = {"cos": "cosine", "raw": "cosine", "cos01": "cosine01", "paper_scorer": "cosine01"}


@dataclass(frozen=True)
class Similarity:
    """A score: `mean` over all items, `per_item` one value per generated image (float64 tensor [N])."""

    mean: float
    per_item: torch.Tensor
    variant: str = "cosine"

    def __float__(self) -> float:
        return self.mean


def resolve_variant(variant: str) -> str:
    """Canonical variant name ("cosine" or "cosine01") from a name or alias."""
    v = _ALIASES.get(variant, variant)
    if v not in VARIANTS:
        raise ValueError(f"unknown score variant '{variant}'; use one of {VARIANTS} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return v


def _as_matrix(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else x, dtype=torch.float64).cpu()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what}: expected embeddings of shape [N, D] with N, D >= 1, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    return t


def _unit(x: torch.Tensor, what: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        bad = (norms[:, 0] == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"{what}: zero-norm embedding(s) at rows {bad}; cosine similarity is undefined")
    return x / norms


def _apply(cos: torch.Tensor, variant: str) -> torch.Tensor:
    return (cos + 1) / 2 if variant == "cosine01" else cos


def cosine_matrix(a, b) -> torch.Tensor:
    """All pairwise cosines: [Na, Nb] float64 matrix with entry (i, j) = cos(a_i, b_j)."""
    a, b = _as_matrix(a, "first embeddings"), _as_matrix(b, "second embeddings")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]} (same backbone for both?)")
    return _unit(a, "first embeddings") @ _unit(b, "second embeddings").T


def pairwise_similarity(gen_emb, ref_emb, variant: str = "cosine", exclude_self: bool = False) -> Similarity:
    """DINO / CLIP-I: mean cosine over all (generated, reference) pairs; per_item = mean over references per image.

    exclude_self=True drops the diagonal (i == j) pairs; use it when gen_emb and ref_emb are the same set, as for
    the "real images" row (similarity between different real photos of a subject, never a photo with itself).
    """
    variant = resolve_variant(variant)
    cos = _apply(cosine_matrix(gen_emb, ref_emb), variant)
    if exclude_self:
        n = cos.shape[0]
        if cos.shape[1] != n:
            raise ValueError(f"exclude_self needs the same set twice, got {n} and {cos.shape[1]} embeddings")
        if n < 2:
            raise ValueError("exclude_self needs at least 2 images (1 image has no pair other than itself)")
        keep = ~torch.eye(n, dtype=torch.bool)
        per_item = (cos * keep).sum(1) / (n - 1)
    else:
        per_item = cos.mean(1)
    # every row averages the same number of pairs, so the mean of row means is the mean over all pairs
    return Similarity(per_item.mean().item(), per_item, variant)


def text_image_similarity(text_emb, img_emb, variant: str = "cosine") -> Similarity:
    """CLIP-T: mean over images of cos(image_i, text_i); one text embedding ([D] or [1, D]) is used for every image."""
    variant = resolve_variant(variant)
    text, img = _as_matrix(text_emb, "text embeddings"), _as_matrix(img_emb, "image embeddings")
    if text.shape[1] != img.shape[1]:
        raise ValueError(f"embedding sizes differ: text {text.shape[1]} vs image {img.shape[1]}")
    if text.shape[0] == 1:
        text = text.expand(img.shape[0], -1)
    if text.shape[0] != img.shape[0]:
        raise ValueError(f"got {text.shape[0]} text embeddings for {img.shape[0]} images; give one per image or one")
    per_item = _apply((_unit(text, "text embeddings") * _unit(img, "image embeddings")).sum(1), variant)
    return Similarity(per_item.mean().item(), per_item, variant)

