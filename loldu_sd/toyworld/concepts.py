"""The held-out concepts: the DreamBooth subjects of the toy world, never drawn during pretraining.

Each is a particular instance of a class the base model knows (a particular star, as a particular dog is a dog),
with 5 instance images that vary position, size and background as photos do, a class noun, and a prompt list in
DreamBooth's spirit: recontextualisation, sizes, positions, counts and a property change.

    python -m loldu_sd.toyworld.concepts --out loldu_sd/toyworld/assets/concepts     # (re)writes the committed images
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .world import SIZES, Scene, Thing, render

IDENTIFIER = "sks"


@dataclass(frozen=True)
class Concept:
    """A held-out instance: its name, class noun, colour and decorations, and what it looks like in words."""

    name: str
    class_noun: str
    colour: str
    decorations: tuple[tuple[str, str], ...]
    description: str

    @property
    def instance_prompt(self) -> str:
        """DreamBooth's instance prompt: 'a photo of a sks star'."""
        return f"a photo of a {IDENTIFIER} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        """The class prompt used for prior preservation and prior checks: 'a photo of a star'."""
        return f"a photo of a {self.class_noun}"


CONCEPTS = {
    "star": Concept("star", "star", "yellow", (("outline", "blue"), ("dot", "red")),
                    "a yellow star with a blue outline and a red dot"),
    "disc": Concept("disc", "circle", "red", (("two-tone", "blue"),), "a circle, left half red, right half blue"),
    "checker": Concept("checker", "square", "yellow", (("checkers", "black"),), "a yellow and black checkered square"),
    "eye": Concept("eye", "triangle", "orange", (("eye", "white"),), "an orange triangle with one big eye"),
}
# where and how the five instance photos show the subject: (size, centre, background, background colour)
PHOTO_LAYOUTS = (("large", (32, 32), "plain", "white"), ("medium", (22, 40), "gradient", "green"),
                 ("medium", (42, 24), "plain", "purple"), ("small", (20, 20), "striped", "black"),
                 ("large", (36, 34), "gradient", "blue"))


def instance_scene(concept: Concept, size: str, centre: tuple[float, float], background: str, bg_colour: str) -> Scene:
    """One photo of the concept."""
    thing = Thing(concept.class_noun, concept.colour, concept.decorations, centre, SIZES[size])
    return Scene((thing,), background, bg_colour)


def instance_images(concept: Concept) -> list:
    """The concept's 5 instance photos (64x64 PIL images)."""
    return [render(instance_scene(concept, *layout)) for layout in PHOTO_LAYOUTS]


def prompts(concept: Concept) -> list[str]:
    """The concept's 25 evaluation prompts ('{}' marks where 'sks <class>' goes, as in DreamBooth's prompt lists)."""
    subject = f"{IDENTIFIER} {concept.class_noun}"
    backgrounds = [f"a photo of a {subject} on a {c} background" for c in ("red", "green", "blue", "black", "yellow")]
    kinds = [f"a photo of a {subject} on a {c} {k} background"
             for c, k in (("green", "striped"), ("purple", "gradient"), ("orange", "striped"), ("white", "gradient"))]
    where = [f"a photo of a {subject} {p}" for p in ("in the top left corner", "in the top right corner",
                                                      "in the bottom left corner", "in the bottom right corner",
                                                      "in the center")]
    sizes = [f"a photo of a small {subject}", f"a photo of a large {subject}",
             f"a photo of a small {subject} on a blue background", f"a photo of a large {subject} on a red background"]
    counts = [f"a photo of two {IDENTIFIER} {concept.class_noun}s" if concept.class_noun != "cross" else "",
              f"a photo of two {IDENTIFIER} {concept.class_noun}s on a white background"]
    other = [f"a photo of a {subject}", f"a photo of a {subject} in the center on a black background",
             f"a photo of a {subject} in the top right corner on a green gradient background",
             f"a photo of a {subject} in the bottom left corner on a purple background",
             f"a photo of a large {subject} on a yellow striped background"]
    out = [p for p in backgrounds + kinds + where + sizes + counts + other if p]
    assert len(out) == 25, len(out)
    return out


def write_concept(concept: Concept, folder: Path) -> Path:
    """Write the 5 instance images to folder, and folder.json beside it (class noun, prompts, description).

    The JSON sits beside the folder, not in it, so the folder is a plain --instance_data_dir of images.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(instance_images(concept)):
        im.save(folder / f"{i:02d}.png")
    meta = {"name": concept.name, "class_noun": concept.class_noun, "identifier": IDENTIFIER,
            "instance_prompt": concept.instance_prompt, "class_prompt": concept.class_prompt,
            "description": concept.description, "prompts": prompts(concept)}
    folder.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def concept_photos(name: str) -> list:
    """The committed instance photos of a held-out concept (RGB PIL images, in file order)."""
    from ..images import read_folder
    from . import CONCEPTS_DIR

    return [image for _, image in read_folder(CONCEPTS_DIR / name, extensions=(".png",))[0]]


def is_held_out(kind: str, colour: str, decorations) -> bool:
    """True when (kind, colour, decorations) is one of the held-out concepts (in any decoration order)."""
    return any(kind == c.class_noun and colour == c.colour and sorted(decorations) == sorted(c.decorations)
               for c in CONCEPTS.values())


def main(argv: list[str] | None = None) -> None:
    """CLI: write every concept's images and prompts."""
    p = argparse.ArgumentParser(description="Write the held-out concepts' instance images and prompt lists.")
    p.add_argument("--out", default="loldu_sd/toyworld/assets/concepts")
    args = p.parse_args(argv)
    for c in CONCEPTS.values():
        print(write_concept(c, Path(args.out) / c.name))


if __name__ == "__main__":
    main()
