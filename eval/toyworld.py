"""Scoring on the embedded toy world: `--backbones toyworld`, the judges' sanity table, the base model's accuracy.

    python -m eval sanity                     # judges' sanity table + the base model's attribute accuracy
    python -m eval score --backbones toyworld --generated outs/star \
        --reference loldu_sd/toyworld/assets/concepts/star ...

The judges (loldu_sd.toyworld.judges) play DINO (instance encoder) and CLIP (image-text model). Attribute accuracy
asks the image-text judge, zero-shot, which kind, colour and background colour a sample shows, among captions that
differ only in that attribute; the same probe on rendered scenes says how far the probe itself can be trusted.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch

from loldu_sd.toyworld import GUIDANCE_SCALE, INFERENCE_STEPS
from loldu_sd.toyworld.concepts import CONCEPTS, concept_photos
from loldu_sd.toyworld.world import COLOURS, HELD_OUT_PAIRS, KINDS, Scene, Thing, render

from .scorer import Scorer, load_images, toyworld_scorer  # noqa: F401  (toyworld_scorer: re-exported)

TOYWORLD = "toyworld"
# generated images with the kind a person saw in each, labelled without seeing the prompts (docs/toyworld.md)
EYE_LABELS_DIR = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "eye_labels"


def generate(pipe, prompts: list[str], seed: int = 0, batch: int = 16, steps: int = INFERENCE_STEPS) -> list:
    """One image per prompt, seeded per position (the i-th image always uses seed + i); `steps` sampler steps."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe(chunk, generator=gens, guidance_scale=GUIDANCE_SCALE, num_inference_steps=steps,
                       height=64, width=64).images
    return images


def sanity_rows(scorer: Scorer, pipe, samples: int = 8, seed: int = 0) -> list[dict]:
    """Per concept: its photos against each other, their codec round trips (the attainable ceiling), other concepts'
    photos, base samples of its class, captions."""
    from .ceiling import codec_ceiling

    rows = []
    for name, concept in CONCEPTS.items():
        ref = scorer.embed_images(concept_photos(name))
        others = [im for other in CONCEPTS if other != name for im in concept_photos(other)]
        base = generate(pipe, [concept.class_prompt] * samples, seed)
        real, vs_others = scorer.score_real(ref), scorer.score(others, ref)
        vs_base = scorer.score(base, ref)
        unrelated = [c.class_prompt for c in CONCEPTS.values() if c is not concept]
        text_match = scorer.score(ref, ref, [concept.class_prompt] * len(ref))["clip_t"]
        text_other = sum(scorer.score(ref, ref, [u] * len(ref))["clip_t"] for u in unrelated) / len(unrelated)
        ceiling = codec_ceiling(pipe, name, scorer)
        rows.append({"concept": name, "real_dino": real["dino"], "real_clip_i": real["clip_i"],
                     "codec_psnr": ceiling["psnr"], "codec_dino": ceiling["dino"], "codec_clip_i": ceiling["clip_i"],
                     "others_dino": vs_others["dino"], "others_clip_i": vs_others["clip_i"],
                     "base_dino": vs_base["dino"], "base_clip_i": vs_base["clip_i"],
                     "clip_t_match": text_match, "clip_t_unrelated": text_other})
    return rows


SANITY_COLUMNS = ["concept", "codec_psnr", "real_dino", "codec_dino", "others_dino", "base_dino", "real_clip_i",
                  "codec_clip_i", "others_clip_i", "base_clip_i", "clip_t_match", "clip_t_unrelated"]
SANITY_HEADERS = ["concept", "codec round trip PSNR (dB)", "DINO* real", "DINO* round trip (ceiling)",
                  "DINO* other concepts", "DINO* base class samples", "CLIP-I* real", "CLIP-I* round trip (ceiling)",
                  "CLIP-I* other concepts", "CLIP-I* base class samples", "CLIP-T* own class", "CLIP-T* other classes"]


def codec_grid(vae, rows: int = 1):
    """Every concept's photos above their codec round trips: what the autoencoder keeps of each concept."""
    from PIL import Image

    from .ceiling import codec_round_trip

    columns = [(p, t) for name in CONCEPTS for p, t in zip(concept_photos(name),
                                                          codec_round_trip(vae, concept_photos(name)))]
    side = columns[0][0].size[0]
    grid = Image.new("RGB", (side * len(columns), 2 * side), "white")
    for i, (photo, trip) in enumerate(columns):
        grid.paste(photo, (i * side, 0))
        grid.paste(trip, (i * side, side))
    return grid


# ---- attribute accuracy ----------------------------------------------------------------------------------------
def probe_prompts(held_out: bool, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(kind, colour, background colour) triples: seen colour x kind pairs, or the held-out ones."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        if ((colour, kind) in HELD_OUT_PAIRS) != held_out:
            continue
        out.append((kind, colour, rng.choice([c for c in COLOURS if c != colour])))
    return out


def prompt_of(kind: str, colour: str, bg: str) -> str:
    """The probe's caption for one triple."""
    return f"a photo of a {colour} {kind} on a {bg} background"


@torch.no_grad()
def attribute_answers(judges, images, triples) -> dict[str, list[tuple[str, str, str]]]:
    """Zero-shot: for each image and attribute, the best-matching caption among those differing only in it."""
    emb = judges.embed_images(images)
    answers = {"kind": [], "colour": [], "background": []}
    options = [{"kind": [(k, colour, bg) for k in KINDS], "colour": [(kind, c, bg) for c in COLOURS if c != bg],
                "background": [(kind, colour, b) for b in COLOURS if b != colour]} for kind, colour, bg in triples]
    captions = sorted({c for o in options for cands in o.values() for c in cands})
    text = dict(zip(captions, judges.embed_texts([prompt_of(*c) for c in captions])))  # each caption encoded once
    for e, opts in zip(emb, options):
        for attr, cands in opts.items():
            sims = torch.stack([text[c] for c in cands]) @ e
            answers[attr].append(cands[int(sims.argmax())])
    return answers


def attribute_hits(judges, images, triples) -> dict[str, list[bool]]:
    """Zero-shot: for each image, is the best-matching caption's kind / colour / background the prompted one?"""
    return hits_of(attribute_answers(judges, images, triples), triples)


def hits_of(answers: dict[str, list[tuple]], triples) -> dict[str, list[bool]]:
    """Per attribute, whether each answer is the prompted triple."""
    return {attr: [a == t for a, t in zip(chosen, triples)] for attr, chosen in answers.items()}


def rendered(triples, seed: int = 0) -> list:
    """Rendered scenes for triples (plain background, medium size, random placement): the probe's own check."""
    rng = random.Random(seed)
    return [render(Scene((Thing(k, c, (), (rng.uniform(20, 44), rng.uniform(20, 44)), 12.0),), "plain", b))
            for k, c, b in triples]


def attribute_accuracy(pipe, judges, n: int = 48, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Rows (source, pairs) -> fraction right for kind, colour, background and all three; and per-kind rows."""
    rows, kind_answers = [], {"rendered": [], "base model": []}
    for held_out in (False, True):
        triples = probe_prompts(held_out, n, seed)
        for source in ("rendered", "base model"):
            images = rendered(triples, seed) if source == "rendered" else generate(
                pipe, [prompt_of(*t) for t in triples], seed)
            answers = attribute_answers(judges, images, triples)
            hits = hits_of(answers, triples)
            all3 = [all(h) for h in zip(*hits.values())]
            rows.append({"images": source, "pairs": "held-out" if held_out else "seen", "n": n,
                         **{k: sum(v) / n for k, v in hits.items()}, "all": sum(all3) / n})
            kind_answers[source] += [(t[0], a[0]) for t, a in zip(triples, answers["kind"])]
    return rows, kind_rows(kind_answers)


def kind_rows(kind_answers: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """Per prompted kind (seen and held-out pairs pooled): how often each source shows it, and the base's confusion."""
    rows = []
    for kind in KINDS:
        by_source = {src: [judged for prompted, judged in pairs if prompted == kind]
                     for src, pairs in kind_answers.items()}
        base = by_source["base model"]
        wrong = Counter(j for j in base if j != kind)
        mistaken = ", ".join(f"{k} {c}" for k, c in wrong.most_common(2))
        rows.append({"kind": kind, "n": len(base),
                     **{src: sum(j == kind for j in judged) / max(len(judged), 1) for src, judged in by_source.items()},
                     "base model's wrong answers": mistaken or "-"})
    return rows


def eye_label_agreement(judges, folder: str | Path = EYE_LABELS_DIR) -> dict:
    """The kind probe on generated images that a person labelled: how often judge, eye and prompt agree."""
    folder = Path(folder)
    rows = json.loads((folder / "labels.json").read_text())
    images, paths = load_images(folder)
    by_name = dict(zip((p.name for p in paths), images))
    missing = [r["image"] for r in rows if r["image"] not in by_name]
    if missing:
        raise FileNotFoundError(f"labelled images missing or unreadable in {folder}: {', '.join(missing[:5])}")
    images = [by_name[r["image"]] for r in rows]
    triples = [(r["kind"], r["colour"], r["background"]) for r in rows]
    judged = [a[0] for a in attribute_answers(judges, images, triples)["kind"]]
    n = len(rows)
    return {"n": n, "eye = prompt": sum(r["kind_by_eye"] == r["kind"] for r in rows) / n,
            "judge = eye": sum(j == r["kind_by_eye"] for j, r in zip(judged, rows)) / n,
            "judge = prompt": sum(j == r["kind"] for j, r in zip(judged, rows)) / n}


ACCURACY_COLUMNS = ["images", "pairs", "n", "kind", "colour", "background", "all"]
EYE_COLUMNS = ["n", "eye = prompt", "judge = eye", "judge = prompt"]
KIND_COLUMNS = ["kind", "n", "rendered", "base model", "base model's wrong answers"]
GRID_PROMPTS = ("a photo of a red star on a blue background", "a photo of a large yellow heart on a green background",
                "a photo of a small blue square in the top left corner on a white background",
                "a photo of two black circles on an orange background",
                "a photo of a purple triangle with a white dot on a yellow striped background",
                "a photo of a white cross with a red outline on a blue gradient background",
                "a photo of a green star on a black background", "a photo of a red ring on a white background")


def sample_grid(pipe, prompts=GRID_PROMPTS, seeds: int = 4, cell: int = 96):
    """A grid of base-model samples: one row per prompt, `seeds` columns, the prompt written on the left."""
    from PIL import Image, ImageDraw

    label_w = 420
    grid = Image.new("RGB", (label_w + seeds * cell, len(prompts) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        draw.text((6, r * cell + cell // 2 - 6), prompt.replace("a photo of ", ""), fill="black")
        for c, im in enumerate(generate(pipe, [prompt] * seeds, seed=100 * r)):
            grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * cell, r * cell))
    return grid
