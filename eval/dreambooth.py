"""`python -m eval dreambooth`: DreamBooth's protocol on LoLDU adapters: generate, score, tabulate, plot.

For each subject: the 25 DreamBooth prompts of its class (live for cats/dogs, object otherwise) x N images, with
per-image seeds (seed + image index within the subject), saved as PNGs; DINO / CLIP-I against the subject's
reference photos and CLIP-T against the prompts (eval.scorer). Several subjects are averaged (mean of per-subject
scores, as DreamBooth averages over its 30 subjects) into a table shaped like DreamBooth's Table 1:
  Real images  DINO and CLIP-I between *different* real photos of the same subject (self-pairs excluded: a photo
               compared with itself would add a constant 1.0); CLIP-T n/a. The paper does not spell out the pairing.
  Base model   (--with_base) the same prompts and seeds without the adapter: what the adapter adds.
  LoLDU        the adapter.
Outputs under --out: results.json, results.csv, table.md, scores.png (bar chart) and per subject
<subject>/images/*.png + prompts.txt, <subject>/grid.png (reference photos on top, one row per prompt), scores.json.
Under `accelerate launch --num_processes N` the prompts are split across the processes and the main one scores.
"""
from __future__ import annotations

import csv
import json
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

from loldu_sd.images import to_rgb
from loldu_sd.pipeline import delete_loldu_adapters, load_loldu_weights

from .prompts import dreambooth_prompts, is_live, subject_class
from .scorer import load_images, markdown_table, write_csv, write_json

# Published numbers (raw cosines as printed). DreamBooth: Ruiz et al., CVPR 2023, Table 1 (SD rows from its
# Stable Diffusion experiments). LoLDU: Shi et al., arXiv 2410.13618, Table VI.
PUBLISHED = [
    {"method": "Real images (DreamBooth paper)", "dino": 0.774, "clip_i": 0.885, "clip_t": None},
    {"method": "DreamBooth, SD (DreamBooth paper)", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    {"method": "Textual Inversion (DreamBooth paper)", "dino": 0.569, "clip_i": 0.780, "clip_t": 0.255},
    {"method": "LoLDU (LoLDU paper, Table VI)", "dino": 0.723, "clip_i": 0.830, "clip_t": 0.319},
]
METRICS = ("dino", "clip_i", "clip_t")
ROWS = (("real", "Real images"), ("base", "Base model (no adapter)"), ("loldu", "LoLDU adapter"))


@dataclass
class Subject:
    """One subject to evaluate: its adapter, its reference photos and its prompt tokens."""

    name: str
    adapter: str
    reference: str
    class_token: str
    unique_token: str = "sks"


def read_manifest(path: str | Path, unique_token: str = "sks") -> list[Subject]:
    """Subjects from a JSON list or a CSV with columns subject, adapter, reference[, class_token, unique_token]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"manifest {path}: expected a non-empty list of subjects")
    out, base = [], path.parent  # relative paths are relative to the manifest
    for i, r in enumerate(rows):
        missing = ["subject", "adapter", "reference"] if not isinstance(r, dict) else [
            k for k in ("subject", "adapter", "reference") if not r.get(k)]
        if missing:
            raise ValueError(f"manifest {path}, entry {i}: missing {', '.join(missing)}")
        adapter = base / r["adapter"]  # kept as written when it is no local path: a Hub repo id
        out.append(Subject(r["subject"], str(adapter) if adapter.exists() else r["adapter"], str(base / r["reference"]),
                           r.get("class_token") or subject_class(r["subject"]), r.get("unique_token") or unique_token))
    return out


def generate(pipe, prompts: list[str], images_per_prompt: int, seed: int, out_dir: Path, desc: str = "generate",
             share: tuple[int, int] = (0, 1), **call_kwargs) -> tuple[list[Image.Image], list[str], list[Path]]:
    """prompts x images_per_prompt images; image k of the subject (k = prompt index * N + j) uses seed + k.

    share = (rank, world): this process draws prompts rank, rank + world, ... and every process gets all the
    images back, in prompt order (accelerate's gather_object); seeds follow k, so the images are the same in any
    split. The main process writes prompts.txt.
    """
    from tqdm.auto import tqdm

    rank, world = share
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for i in tqdm(range(rank, len(prompts), world), desc=desc):
        # CPU generators: the same initial noise on any device, independent of batch size
        gens = [torch.Generator("cpu").manual_seed(seed + i * images_per_prompt + j) for j in range(images_per_prompt)]
        batch = pipe(prompts[i], num_images_per_prompt=images_per_prompt, generator=gens, **call_kwargs).images
        for j, im in enumerate(batch):
            im.save(out_dir / f"{i:03d}_{j:02d}.png")
            made.append((i, j, im))
    if world > 1:
        from accelerate.utils import gather_object

        made = sorted(gather_object(made), key=lambda item: item[:2])
    images, per_image = [im for _, _, im in made], [prompts[i] for i, _, _ in made]
    paths = [out_dir / f"{i:03d}_{j:02d}.png" for i, j, _ in made]
    if rank == 0:  # rescore with `python -m eval score --prompts`
        (out_dir / "prompts.txt").write_text("\n".join(per_image) + "\n")
    return images, per_image, paths


def image_grid(reference: list[Image.Image], rows: list[list[Image.Image]], labels: list[str], cell: int = 128,
               band: int = 14) -> Image.Image:
    """Reference photos on the top row, then one row per prompt; each row under a one-line label (centre-cropped)."""
    ncol = max(len(reference), *(len(r) for r in rows))
    grid = Image.new("RGB", (ncol * cell, (len(rows) + 1) * (cell + band)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip([reference] + rows, ["reference images"] + labels)):
        y = r * (cell + band)
        draw.text((2, y + 1), label, fill="black")
        for c, im in enumerate(row):
            grid.paste(ImageOps.fit(to_rgb(im), (cell, cell), Image.Resampling.BICUBIC), (c * cell, y + band))
    return grid


def bar_chart(rows: list[dict], path: Path, title: str) -> Path:
    """Grouped bars of DINO / CLIP-I / CLIP-T, one colour per row (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    for k, row in enumerate(rows):
        xs = [m + k * width for m in range(len(METRICS))]
        vals = [row.get(m) or 0.0 for m in METRICS]  # n/a (real images' CLIP-T) drawn as an empty bar
        bars = ax.bar(xs, vals, width, label=row["method"])
        ax.bar_label(bars, labels=["n/a" if row.get(m) is None else f"{row[m]:.3f}" for m in METRICS], fontsize=7)
    ax.set_xticks([m + width * (len(rows) - 1) / 2 for m in range(len(METRICS))], ["DINO", "CLIP-I", "CLIP-T"])
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def evaluate(pipe, scorer, subjects: list[Subject], out: str | Path, images_per_prompt: int = 4,
             prompts_limit: int | None = None, seed: int = 0, with_base: bool = False, identifier: str = "drop",
             share: tuple[int, int] = (0, 1), **call_kwargs) -> dict | None:
    """Run the protocol with a loaded pipeline (needs load_loldu_weights / delete_loldu_adapters) and a Scorer.

    share = (rank, world) under several processes: the images are split across them (see generate) and the main
    process (rank 0) alone scores and writes; the others return None.
    """
    out, main = Path(out), share[0] == 0
    refs = {s.name: load_images(s.reference) for s in subjects}  # fail on bad folders before any generation
    per_subject, base_cache, base_embeddings = [], {}, {}
    for s in subjects:
        prompts = dreambooth_prompts(s.unique_token, s.class_token, prompts_limit)

        def run(tag: str, images_dir: Path) -> tuple[list[Image.Image], list[str], list[str]]:
            imgs, texts, paths = generate(pipe, prompts, images_per_prompt, seed, images_dir, f"{s.name} {tag}",
                                          share, **call_kwargs)
            return imgs, [p.relative_to(out).as_posix() for p in paths], texts

        key = (tuple(prompts), images_per_prompt)
        if with_base and key not in base_cache:  # same prompts and seeds without adapter, shared by such subjects
            base_cache[key] = run("base", out / "base" / f"{s.unique_token}_{s.class_token}".replace(" ", "_"))
        name = load_loldu_weights(pipe, s.adapter, adapter_name=s.name)
        try:
            adapted = run("LoLDU", out / s.name / "images")
        finally:
            delete_loldu_adapters(pipe, name or s.name)  # the next subject starts from the base model again
        if main:
            if with_base and key not in base_embeddings:
                imgs, names, texts = base_cache[key]
                base_embeddings[key] = scorer.embed_images(imgs, names), texts
            per_subject.append(score_subject(scorer, s, refs[s.name], prompts, base_embeddings.get(key), adapted,
                                             identifier, out))
    return summarise(per_subject, out, scorer.describe()) if main else None


def score_subject(scorer, s: Subject, reference: tuple[list, list[Path]], prompts: list[str], base, adapted,
                  identifier: str, out: Path) -> dict:
    """One subject's real, base ((embeddings, texts) or None) and adapter scores; writes its grid and scores.json."""
    ref_images, ref_paths = reference
    ref = scorer.embed_images(ref_images, [p.name for p in ref_paths])
    rec = {**asdict(s), "live": is_live(s.class_token), "n_prompts": len(prompts)}
    if len(ref) > 1:
        rec["real"] = scorer.score_real(ref)
    else:
        warnings.warn(f"{s.name}: only 1 reference image, so no 'real images' row (it needs 2 or more)")
    if base is not None:
        rec["base"] = scorer.score(base[0], ref, base[1], unique_token=s.unique_token, identifier=identifier)
    imgs, names, texts = adapted
    rec["loldu"] = scorer.score(scorer.embed_images(imgs, names), ref, texts, unique_token=s.unique_token,
                                identifier=identifier)
    n = len(imgs) // len(prompts)
    image_grid(ref_images, [imgs[i * n:(i + 1) * n] for i in range(len(prompts))], prompts).save(
        out / s.name / "grid.png")
    write_json(out / s.name / "scores.json", rec)
    return rec


def summarise(per_subject: list[dict], out: Path, backbones: dict) -> dict:
    """Average per-subject scores into Table-1 rows; write results.json/.csv, table.md and scores.png."""
    table = []
    for key, label in ROWS:
        recs = [r[key] for r in per_subject if key in r]
        if recs:
            table.append({"method": label, "n_subjects": len(recs), **{
                m: None if recs[0][m] is None else statistics.fmean(r[m] for r in recs) for m in METRICS}})
    csv_rows = [{"subject": r["name"], "class_token": r["class_token"], "method": label,
                 **{m: r[key][m] for m in METRICS}, "n_generated": r[key]["n_generated"],
                 "n_reference": r[key]["n_reference"]} for r in per_subject for key, label in ROWS if key in r]
    csv_rows += [{"subject": "mean", **row} for row in table]
    cols = ["subject", "class_token", "method", "dino", "clip_i", "clip_t", "n_generated", "n_reference", "n_subjects"]
    write_csv(out / "results.csv", csv_rows, cols)
    variant = per_subject[0]["loldu"]["variant"]
    md = (f"{len(per_subject)} subject(s), score variant '{variant}'. Backbones: {backbones}\n\n"
          + markdown_table(table, ["method", "dino", "clip_i", "clip_t"], ["Method", "DINO", "CLIP-I", "CLIP-T"])
          + "\n\nPublished (as printed in the papers; for reference):\n\n"
          + markdown_table(PUBLISHED, ["method", "dino", "clip_i", "clip_t"], ["Method", "DINO", "CLIP-I", "CLIP-T"]))
    (out / "table.md").write_text(md + "\n")
    title = f"DreamBooth metrics, {len(per_subject)} subject(s), {variant}" + (
        " - random backbones, NOT meaningful" if "note" in backbones else "")
    bar_chart(table, out / "scores.png", title)
    result = {"table": table, "published": PUBLISHED, "backbones": backbones, "subjects": per_subject, "markdown": md}
    write_json(out / "results.json", result)
    return result


# ---- command line -----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """Options of `python -m eval dreambooth` (scoring options are added by eval.scorer.add_scorer_arguments)."""
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers SD folder.")
    p.add_argument("--subject", action="append", default=[], help="Subject name (repeatable, one per adapter).")
    p.add_argument("--adapter", action="append", default=[], help="LoLDU adapter file or folder, per --subject.")
    p.add_argument("--reference", action="append", default=[], help="Folder of the subject's real photos.")
    p.add_argument("--class_token", action="append", default=[],
                   help="Class noun per --subject (default: the DreamBooth dataset's class of that subject name).")
    p.add_argument("--unique_token", default="sks", help="The subject's identifier in the prompts.")
    p.add_argument("--manifest", default=None, help="JSON list / CSV of subject, adapter, reference[, class_token, "
                                                    "unique_token] instead of --subject groups.")
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--prompts_limit", type=int, default=None, help="Only the first N of the 25 prompts (smoke runs).")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None, help="Default: the model's own sample size.")
    p.add_argument("--seed", type=int, default=0, help="Image k of a subject uses seed + k.")
    p.add_argument("--with_base", action="store_true", help="Also score the base model (same prompts, no adapter).")
    p.add_argument("--out", default="dreambooth_eval", help="Output folder.")


def subjects_from_args(args) -> list[Subject]:
    """Subject list from --manifest or from the repeatable --subject/--adapter/--reference[/--class_token] groups."""
    if args.manifest:
        if args.subject or args.adapter or args.reference:
            raise ValueError("give either --manifest or --subject/--adapter/--reference groups, not both")
        return read_manifest(args.manifest, args.unique_token)
    n = len(args.subject)
    if n == 0:
        raise ValueError("no subject: give --subject NAME --adapter PATH --reference DIR (repeatable) or --manifest")
    if len(args.adapter) != n or len(args.reference) != n:
        raise ValueError(f"got {n} --subject, {len(args.adapter)} --adapter and {len(args.reference)} --reference; "
                         "give one of each per subject")
    if args.class_token and len(args.class_token) != n:
        raise ValueError(f"got {len(args.class_token)} --class_token for {n} --subject; give one per subject or none")
    classes = args.class_token or [subject_class(s) for s in args.subject]
    if len(set(args.subject)) != n:
        raise ValueError(f"subject names must be unique (they name adapters and folders): {args.subject}")
    return [Subject(*g, args.unique_token) for g in zip(args.subject, args.adapter, args.reference, classes)]


def load_pipeline(name_or_path: str, device: str):
    """The base pipeline (fp16 on CUDA) with its own progress bar off."""
    from loldu_sd.loading import load_pipeline as load

    return load(name_or_path, device)


def run(args) -> dict:
    """`python -m eval dreambooth`: load, generate, score, write; prints the table."""
    from .scorer import scorer_from_args

    from loldu_sd.pipeline import resolve_adapter_file

    subjects = subjects_from_args(args)
    if args.images_per_prompt < 1:
        raise ValueError(f"--images_per_prompt must be >= 1, got {args.images_per_prompt}")
    for s in subjects:  # cheap checks first: a missing adapter should not cost a pipeline load and base images
        s.adapter = str(resolve_adapter_file(s.adapter))
        if not Path(s.reference).is_dir():
            raise FileNotFoundError(f"reference folder {s.reference} (subject {s.name}) does not exist")
    from accelerate import PartialState

    state = PartialState()  # one process, or those of `accelerate launch`: each draws its share of the prompts
    scorer = scorer_from_args(args)
    device = args.device or (str(state.device) if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.pretrained_model_name_or_path, device)
    kw = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    if args.resolution:
        kw.update(height=args.resolution, width=args.resolution)
    result = evaluate(pipe, scorer, subjects, args.out, args.images_per_prompt, args.prompts_limit, args.seed,
                      args.with_base, args.identifier, (state.process_index, state.num_processes), **kw)
    state.wait_for_everyone()
    if result is None:  # not the main process: its images went to the main one
        return {}
    print(result["markdown"])
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.csv, table.md, scores.png and per-subject grids")
    return result
