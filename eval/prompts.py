"""The DreamBooth evaluation protocol as data: 30 subjects, their classes, and the 25 object / 25 live-subject prompts.

Source: the DreamBooth dataset (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", CVPR 2023, https://github.com/google/dreambooth; prompts_and_classes.txt, CC-BY 4.0).
The prompt templates are copied exactly: `{0}` is the unique token (e.g. "sks"), `{1}` the class token (e.g. "dog").

CLIP-T text rule (`clip_t_prompt`). The paper defines CLIP-T as the cosine similarity between the image and the
prompt's CLIP text embedding but does not say what happens to the rare identifier. Default `identifier="drop"`:
the identifier is removed and the class noun kept ("a sks dog in the snow" -> "a dog in the snow"), because
  - the identifier is a deliberately rare token that means nothing to CLIP's text encoder, or worse something
    unrelated ("sks" is a known CLIP token), so keeping it adds noise that depends on the arbitrary token choice;
  - CLIP-T is meant to measure prompt fidelity (the context: snow, a santa hat), which the class-noun prompt
    captures; subject fidelity is what DINO and CLIP-I measure.
`identifier="keep"` scores the generation prompt verbatim, for comparison with implementations that do that.
"""
from __future__ import annotations

import re

# subject folder name -> class token (DreamBooth dataset, prompts_and_classes.txt)
SUBJECTS: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock",
    "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog", "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy", "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy",
    "red_cartoon": "cartoon", "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}

# Live subjects (pets) get LIVE_PROMPTS; in the dataset these are exactly the cat and dog classes (9 of 30 subjects).
LIVE_CLASSES: frozenset[str] = frozenset({"cat", "dog"})

# The first ten prompts are the same for objects and live subjects.
_SHARED_PROMPTS: tuple[str, ...] = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)

OBJECT_PROMPTS: tuple[str, ...] = _SHARED_PROMPTS + (
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

LIVE_PROMPTS: tuple[str, ...] = _SHARED_PROMPTS + (
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

IDENTIFIER_MODES = ("drop", "keep")


def subject_class(subject: str) -> str:
    """The DreamBooth class token of a dataset subject (e.g. "dog2" -> "dog")."""
    if subject not in SUBJECTS:
        raise KeyError(f"'{subject}' is not a DreamBooth dataset subject; pass its class token explicitly "
                       f"(known subjects: {', '.join(sorted(SUBJECTS))})")
    return SUBJECTS[subject]


def is_live(class_token: str) -> bool:
    """True for live subjects (cat and dog classes), which use LIVE_PROMPTS."""
    return class_token.strip().lower() in LIVE_CLASSES


def prompt_templates(class_token: str) -> tuple[str, ...]:
    """The 25 templates DreamBooth uses for this class: LIVE_PROMPTS for cats and dogs, else OBJECT_PROMPTS."""
    return LIVE_PROMPTS if is_live(class_token) else OBJECT_PROMPTS


def dreambooth_prompts(unique_token: str, class_token: str, limit: int | None = None) -> list[str]:
    """The evaluation prompts for one subject, e.g. ("sks", "dog") -> ["a sks dog in the jungle", ...]."""
    if limit is not None and limit < 1:
        raise ValueError(f"prompts limit must be >= 1, got {limit}")
    return [t.format(unique_token, class_token) for t in prompt_templates(class_token)[:limit]]


def clip_t_prompt(prompt: str, unique_token: str | None = "sks", identifier: str = "drop") -> str:
    """The text CLIP-T scores against: "drop" removes the identifier word ("a sks dog" -> "a dog"), "keep" doesn't."""
    if identifier not in IDENTIFIER_MODES:
        raise ValueError(f"identifier must be one of {IDENTIFIER_MODES}, got '{identifier}'")
    if identifier == "keep" or not unique_token:
        return prompt
    # whole-word match only, so "sks" never eats part of "tasks"; then tidy the doubled space it leaves
    text = re.sub(rf"(?<!\w){re.escape(unique_token)}(?!\w)", " ", prompt)
    return re.sub(r"\s+", " ", text).strip()
