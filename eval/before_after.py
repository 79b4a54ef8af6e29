"""Before/after picture and scores of one adapter on the toy world: the same prompts and seeds, base against adapter.

    python -m eval.before_after --adapter outputs/star --concept star --out outputs/star/before_after.png

Scores (toy-world judges, cosine): subject fidelity DINO* and CLIP-I* against the concept's photos and prompt
fidelity CLIP-T* over the concept's 25 prompts (one seeded image each), and the prior: DINO* between base and
adapter samples of the class prompt made with the same seeds (1.0 = the class is drawn exactly as before).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from loldu_sd.pipeline import load_loldu_weights
from loldu_sd.toyworld import PIPELINE_DIR, load_pipeline
from loldu_sd.toyworld.concepts import CONCEPTS, IDENTIFIER, concept_photos, prompts

from .ceiling import codec_ceiling, gap_closed
from .toyworld import generate, toyworld_scorer

SHOWN = (20, 2, 5, 18)  # indexes into the concept prompt list: plain, a background, a striped one, two of it
CELL, PRIOR_SAMPLES = 128, 8


def score_set(scorer, images, reference, texts) -> dict:
    """DINO*, CLIP-I*, CLIP-T* of generated images against the concept photos and their prompts."""
    r = scorer.score(images, reference, texts, unique_token=IDENTIFIER)
    return {k: round(r[k], 4) for k in ("dino", "clip_i", "clip_t")}


def prior_similarity(scorer, base, adapted) -> float:
    """Mean DINO* cosine between same-seed class-prompt samples of the base and the adapted model."""
    a, b = scorer.embed_images(base).dino, scorer.embed_images(adapted).dino
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()), 4)


def run(pipeline: str | Path, adapter: str | Path, concept_name: str, seed: int = 0) -> dict:
    """Generate and score base and adapter images; returns scores and the images for the picture."""
    concept, scorer = CONCEPTS[concept_name], toyworld_scorer()
    pipe, texts = load_pipeline(pipeline), prompts(concept)
    reference = concept_photos(concept_name)
    shown = [texts[i] for i in SHOWN for _ in range(2)]
    out = {"concept": concept_name, "adapter": str(adapter), "seed": seed, "images": {},
           "ceiling": codec_ceiling(pipe, concept_name, scorer)}  # the best any UNet method can reach here
    for label in ("base", "adapter"):
        if label == "adapter":
            load_loldu_weights(pipe, adapter)
        out[label] = score_set(scorer, generate(pipe, texts, seed), reference, texts)
        out["images"][label] = generate(pipe, shown, seed + 1000)
        out["images"][label + "_class"] = generate(pipe, [concept.class_prompt] * PRIOR_SAMPLES, seed + 2000)
    out["prior"] = prior_similarity(scorer, out["images"]["base_class"], out["images"]["adapter_class"])
    out["gap_closed"] = {k: round(gap_closed(out["base"][k], out["adapter"][k], out["ceiling"][k]), 3)
                         for k in ("dino", "clip_i")}
    out["images"]["reference"], out["shown_prompts"] = reference, shown
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def picture(result: dict) -> Image.Image:
    """Photos on top, then base and adapter rows under the prompts they were made from, then the scores."""
    images, cols = result["images"], len(result["shown_prompts"])
    label_w, head, width = 110, 44, 110 + cols * CELL
    canvas = Image.new("RGB", (width, 40 + CELL + head + 2 * CELL + 92), "white")
    d, small, big = ImageDraw.Draw(canvas), _font(12), _font(16)
    d.text((8, 10), f"concept '{result['concept']}': {CONCEPTS[result['concept']].description}", fill="black",
           font=big)
    y = 40
    d.text((8, y + CELL // 2), "instance\nphotos", fill="black", font=small)
    for i, im in enumerate(images["reference"]):
        canvas.paste(im.resize((CELL, CELL), Image.Resampling.NEAREST), (label_w + i * CELL, y))
    y += CELL + 4
    for i, p in enumerate(result["shown_prompts"][::2]):
        d.text((label_w + 2 * i * CELL + 4, y + 4), p.replace("a photo of ", ""), fill="black", font=small)
    y += head - 4
    for label in ("base", "adapter"):
        d.text((8, y + CELL // 2), "base model" if label == "base" else "with adapter", fill="black", font=small)
        for i, im in enumerate(images[label]):
            canvas.paste(im.resize((CELL, CELL), Image.Resampling.NEAREST), (label_w + i * CELL, y))
        y += CELL
    b, a = result["base"], result["adapter"]
    d.text((8, y + 10), f"subject fidelity  DINO* {b['dino']:.3f} -> {a['dino']:.3f}   CLIP-I* {b['clip_i']:.3f} -> "
           f"{a['clip_i']:.3f}      prompt fidelity  CLIP-T* {b['clip_t']:.3f} -> {a['clip_t']:.3f}", fill="black",
           font=small)
    c, g = result["ceiling"], result["gap_closed"]
    d.text((8, y + 54), f"codec round trip of the photos (the ceiling of any method): DINO* {c['dino']:.3f}  CLIP-I* "
           f"{c['clip_i']:.3f}; gap to it closed: DINO* {g['dino']:.0%}  CLIP-I* {g['clip_i']:.0%}", fill="black",
           font=small)
    d.text((8, y + 32), f"prior kept (DINO* of class-prompt samples, base vs adapter, same seeds): "
           f"{result['prior']:.3f}    (* = toy-world judges; 25 prompts, one seeded image each)", fill="black",
           font=small)
    return canvas


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 with one line for bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="Adapter folder or .safetensors file.")
    p.add_argument("--concept", default="star", choices=sorted(CONCEPTS), help="Held-out concept it was trained on.")
    p.add_argument("--pretrained_model_name_or_path", default=str(PIPELINE_DIR))
    p.add_argument("--out", default=None, help="PNG path (default: <adapter folder>/before_after.png).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    adapter = Path(args.adapter)
    out = Path(args.out) if args.out else (adapter if adapter.is_dir() else adapter.parent) / "before_after.png"
    try:
        result = run(args.pretrained_model_name_or_path, adapter, args.concept, args.seed)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    picture(result).save(out)
    scores = {k: v for k, v in result.items() if k != "images"}
    out.with_suffix(".json").write_text(json.dumps(scores, indent=2) + "\n")
    print(f"{'':10} {'DINO*':>7} {'CLIP-I*':>8} {'CLIP-T*':>8}")
    for label in ("base", "adapter"):
        s = result[label]
        print(f"{label:10} {s['dino']:7.3f} {s['clip_i']:8.3f} {s['clip_t']:8.3f}")
    c, g = result["ceiling"], result["gap_closed"]
    print(f"{'ceiling':10} {c['dino']:7.3f} {c['clip_i']:8.3f}          (codec round trip of the photos)")
    print(f"gap to the ceiling closed: DINO* {g['dino']:.0%}, CLIP-I* {g['clip_i']:.0%}")
    print(f"prior kept: {result['prior']:.3f}\nwrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
