"""`python -m eval {score,dreambooth}`: DreamBooth's DINO / CLIP-I / CLIP-T scores (see eval.scorer, eval.dreambooth).

    python -m eval score --generated outs/dog --reference data/dog --prompts outs/dog/prompts.txt --out scores/dog
    python -m eval sanity       # toy world: the judges' sanity table and the base model's attribute accuracy
    python -m eval dreambooth --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --subject dog --adapter outputs/dog --reference data/dog --with_base --out eval_dog

`score` prompts: --prompt TEXT for every image, or --prompts FILE with one line per image in sorted filename order.
Offline smoke runs: --backbones random-tiny (tiny random-weight models; the numbers are not meaningful).
(The performance benchmark is a separate module: python -m eval.bench.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_args(args: argparse.Namespace) -> None:
    """Flags that would fail only after the scoring: an empty --prompt, an --out that is a file or not writable."""
    import os

    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty; give the prompt the images were generated with, e.g. "
                         "'a photo of sks dog'")
    out = Path(args.out)
    if not str(args.out).strip():
        raise ValueError("--out is empty; give a folder for the results")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder; give a folder for the results")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot be created ({existing} is not a writable folder)")


def run_score(args: argparse.Namespace) -> dict:
    """`score`: score a folder of generated images against a folder of reference photos; print and write results."""
    from .scorer import load_images, markdown_table, scorer_from_args, write_csv, write_json

    images, paths = load_images(args.generated)
    prompts = args.prompt if args.prompt is not None else read_prompts(args.prompts)
    if isinstance(prompts, list) and len(prompts) != len(images):
        raise ValueError(f"prompts file {args.prompts} has {len(prompts)} prompts but {args.generated} has "
                         f"{len(images)} readable images; give one line per image, in sorted filename order "
                         f"({paths[0].name} ... {paths[-1].name})")
    scorer = scorer_from_args(args)
    gen = scorer.embed_images(images, [p.name for p in paths])
    result = scorer.score(gen, args.reference, prompts, unique_token=args.unique_token, identifier=args.identifier)
    result.update(generated=str(args.generated), reference=str(args.reference))
    cols = ["dino", "clip_i", "clip_t", "n_generated", "n_reference", "variant"]
    print(markdown_table([result], cols, ["DINO", "CLIP-I", "CLIP-T", "generated", "reference", "variant"]))
    if "note" in result:
        print(f"\nNOTE: {result['note']}")
    out = Path(args.out)
    write_json(out / "scores.json", result)
    write_csv(out / "scores.csv", [result], cols + ["identifier", "unique_token", "dino_backbone", "clip_backbone",
                                                    "generated", "reference"])
    per_image_cols = ["image", "prompt", "clip_t_text", "dino", "clip_i", "clip_t"]
    write_csv(out / "per_image.csv", result["per_image"], per_image_cols)
    print(f"\nwrote {out / 'scores.json'}, {out / 'scores.csv'}, {out / 'per_image.csv'}")
    return result


def run_sanity(args: argparse.Namespace) -> dict:
    """`sanity`: the toy-world judges' sanity table and the base model's attribute accuracy; print and write them."""
    from loldu_sd.toyworld import load_pipeline
    from loldu_sd.toyworld.judges import load_judges

    from .scorer import markdown_table, write_json
    from .toyworld import (ACCURACY_COLUMNS, EYE_COLUMNS, KIND_COLUMNS, SANITY_COLUMNS, SANITY_HEADERS,
                           attribute_accuracy, codec_grid, eye_label_agreement, sample_grid, sanity_rows,
                           toyworld_scorer)

    pipe = load_pipeline(args.pretrained_model_name_or_path)
    rows = sanity_rows(toyworld_scorer(args.judges), pipe, args.samples, args.seed)
    print("Judges' sanity table (cosine; * = toy-world judge):\n")
    print(markdown_table(rows, SANITY_COLUMNS, SANITY_HEADERS))
    judges = load_judges(args.judges)
    accuracy, per_kind = attribute_accuracy(pipe, judges, args.probe_prompts, args.seed)
    print("\nAttribute accuracy (zero-shot image-text judge; 'rendered' = the probe on true renders):\n")
    print(markdown_table(accuracy, ACCURACY_COLUMNS))
    print("\nKind accuracy per prompted kind (seen and held-out pairs pooled):\n")
    print(markdown_table(per_kind, KIND_COLUMNS))
    eye = eye_label_agreement(judges)
    print("\nThe kind probe against a person's labels of the committed pipeline's samples (labelled blind):\n")
    print(markdown_table([eye], EYE_COLUMNS))
    result = {"sanity": rows, "attribute_accuracy": accuracy, "kind_accuracy": per_kind, "eye_labels": eye}
    grid = Path(args.out) / "samples.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(pipe).save(grid)
    print(f"wrote {grid} (base-model samples; the last two rows are held-out colour x kind pairs)")
    codec_grid(pipe.vae).save(Path(args.out) / "codec.png")
    print(f"wrote {Path(args.out) / 'codec.png'} (each concept's photos above their codec round trips)")
    print(f"\nwrote {write_json(Path(args.out) / 'sanity.json', result)}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The `python -m eval` parser with its two subcommands."""
    from . import dreambooth
    from .scorer import add_scorer_arguments

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="Score a folder of generated images.", formatter_class=fmt)
    s.add_argument("--generated", required=True, help="Folder of generated images.")
    s.add_argument("--reference", required=True, help="Folder of the subject's real photos.")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="The prompt of every generated image.")
    g.add_argument("--prompts", help="File with one prompt per generated image (sorted filename order).")
    s.add_argument("--unique_token", default="sks", help="Identifier that --identifier drop removes for CLIP-T.")
    s.add_argument("--out", default="eval_scores", help="Folder for scores.json, scores.csv, per_image.csv.")
    add_scorer_arguments(s)
    d = sub.add_parser("dreambooth", help="Generate with adapters and score them (DreamBooth protocol).",
                       description=dreambooth.__doc__, formatter_class=fmt)
    dreambooth.add_arguments(d)
    add_scorer_arguments(d)
    t = sub.add_parser("sanity", help="Toy world: judges' sanity table and the base model's attribute accuracy.")
    from loldu_sd.toyworld import JUDGES_DIR, PIPELINE_DIR

    t.add_argument("--pretrained_model_name_or_path", default=str(PIPELINE_DIR), help="Toy-world pipeline folder.")
    t.add_argument("--judges", default=str(JUDGES_DIR), help="Toy-world judges folder.")
    t.add_argument("--samples", type=int, default=8, help="Base-model samples of each class prompt.")
    t.add_argument("--probe_prompts", type=int, default=48, help="Prompts per attribute-accuracy row.")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="eval_sanity", help="Folder for sanity.json.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line error for bad input)."""
    from .scorer import BackboneUnavailableError

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.command == "score":
            run_score(args)
        elif args.command == "sanity":
            run_sanity(args)
        else:
            from .dreambooth import run

            run(args)
    except (ValueError, FileNotFoundError, KeyError, BackboneUnavailableError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
