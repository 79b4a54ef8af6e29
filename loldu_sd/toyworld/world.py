"""The toy world: seeded scenes of coloured shapes on backgrounds, rendered at 64x64, with DreamBooth-style captions.

    scene = sample_scene(random.Random(0))          # one or two objects, a background, what the caption says
    image = render(scene)                           # 64x64 RGB PIL image (drawn at 4x and box-filtered: crisp edges)
    caption(scene)                                  # "a photo of a red star with a blue dot on a green background"

Objects have a kind, a colour, a size, a position and at most one decoration (a dot, an outline or stripes, in a
second colour); eight colour x kind pairs (`HELD_OUT_PAIRS`) are never sampled, to test composition. Richer
instances (two decorations, two-tone, checkers, an eye) are never sampled for pretraining: they are what the
held-out concepts in `concepts.py` are made of, as a particular dog is still a dog.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4
COLOURS = {"red": (220, 38, 38), "orange": (247, 140, 20), "yellow": (250, 218, 30), "green": (40, 160, 60),
           "blue": (35, 85, 225), "purple": (135, 55, 190), "white": (245, 245, 245), "black": (25, 25, 25)}
KINDS = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart")
PLURALS = {k: ("crosses" if k == "cross" else k + "s") for k in KINDS}
# radius in pixels at 64x64; an outline narrower than ~3 latent pixels (16x16 latents) the generator draws as a blob
SIZES = {"small": 10.0, "medium": 13.0, "large": 17.0}
POSITIONS = {"in the center": (32, 32), "in the top left corner": (17, 17), "in the top right corner": (47, 17),
             "in the bottom left corner": (17, 47), "in the bottom right corner": (47, 47)}
BACKGROUNDS = ("plain", "gradient", "striped")
DECORATIONS = ("dot", "outline", "stripes")  # pretraining decorations; `render` also draws the richer ones below
RICH_DECORATIONS = ("two-tone", "checkers", "eye")
# colour x kind pairs the generator never sees: does it compose words it knows into pictures it never saw?
HELD_OUT_PAIRS = (("green", "star"), ("blue", "heart"), ("purple", "square"), ("white", "triangle"),
                  ("orange", "circle"), ("yellow", "cross"), ("black", "diamond"), ("red", "ring"))


@dataclass(frozen=True)
class Thing:
    """One drawn object: kind, colour and decorations (pattern name -> colour name), at a centre and radius."""

    kind: str
    colour: str
    decorations: tuple[tuple[str, str], ...] = ()
    centre: tuple[float, float] = (32.0, 32.0)
    radius: float = 12.0


@dataclass(frozen=True)
class Scene:
    """What is drawn (things, background) and which attributes the caption names."""

    things: tuple[Thing, ...]
    background: str = "plain"
    background_colour: str = "white"
    size_word: str | None = None
    position_word: str | None = None
    says: frozenset = field(default_factory=lambda: frozenset({"colour", "decoration", "background"}))


# ---- shapes as masks -----------------------------------------------------------------------------------------------
def _polygon(cx: float, cy: float, radii: list[float], start_deg: float = -90.0) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(math.radians(start_deg + 360 * i / n)),
             cy + r * math.sin(math.radians(start_deg + 360 * i / n))) for i, r in enumerate(radii)]


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(60):
        t = 2 * math.pi * i / 60
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.1))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw a filled `kind` of radius r at (cx, cy) (supersampled pixel units)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, fill=fill)
        draw.ellipse((cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=0)
    elif kind == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy + 0.2 * r, [1.15 * r] * 3), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy + 0.08 * r, [1.1 * r, 0.45 * r] * 5), fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - 1.1 * r), (cx + 0.75 * r, cy), (cx, cy + 1.1 * r), (cx - 0.75 * r, cy)], fill=fill)
    elif kind == "cross":
        w = 0.33 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif kind == "heart":
        draw.polygon(_heart(cx, cy, 1.1 * r), fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")


def _mask(kind: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    m = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(m), kind, cx, cy, r, 255)
    return m


def _pattern(name: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    """Where a decoration's second colour goes (before clipping to the shape)."""
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    if name in ("dot", "eye"):
        d.ellipse((cx - 0.38 * r, cy - 0.38 * r, cx + 0.38 * r, cy + 0.38 * r), fill=255)
    elif name == "stripes":
        step = max(2.0, 0.5 * r)
        y = cy - r
        while y < cy + r:
            d.rectangle((cx - r, y, cx + r, y + step / 2), fill=255)
            y += step
    elif name == "two-tone":
        d.rectangle((cx, cy - 2 * r, cx + 2 * r, cy + 2 * r), fill=255)
    elif name == "checkers":
        step = 0.425 * r  # four cells across a square (half side 0.85 r)
        for i in range(-4, 4):
            for j in range(-4, 4):
                if (i + j) % 2 == 0:
                    x0, y0 = cx + i * step, cy + j * step
                    d.rectangle((x0, y0, x0 + step, y0 + step), fill=255)
    else:
        raise ValueError(f"unknown decoration {name!r}")
    return m


def _paste_thing(img: Image.Image, t: Thing, s: int) -> None:
    cx, cy, r, side = t.centre[0] * s, t.centre[1] * s, t.radius * s, img.size[0]
    shape = _mask(t.kind, cx, cy, r, side)
    img.paste(COLOURS[t.colour], mask=shape)
    for name, colour in t.decorations:
        if name == "outline":
            inner = _mask(t.kind, cx, cy, r * 0.72, side)
            rim = Image.new("L", (side, side), 0)
            rim.paste(shape, mask=shape)
            rim.paste(0, mask=inner)
            img.paste(COLOURS[colour], mask=rim)
            continue
        pattern = _pattern(name, cx, cy, r, side)
        clipped = Image.new("L", (side, side), 0)
        clipped.paste(pattern, mask=shape)
        img.paste(COLOURS[colour], mask=clipped)
        if name == "eye":  # a pupil in the eye's second colour's opposite
            pupil = _pattern("dot", cx, cy, r * 0.45, side)
            img.paste(COLOURS["black" if colour != "black" else "white"], mask=pupil)


def _background(kind: str, colour: str, side: int) -> Image.Image:
    c = COLOURS[colour]
    if kind == "plain":
        return Image.new("RGB", (side, side), c)
    img = Image.new("RGB", (side, side), c)
    d = ImageDraw.Draw(img)
    light = tuple(int(v + 0.55 * (255 - v)) for v in c)
    if kind == "gradient":
        for y in range(side):
            a = y / (side - 1)
            d.line((0, y, side, y), fill=tuple(int(light[i] * (1 - a) + c[i] * a) for i in range(3)))
    elif kind == "striped":
        step = side // 8
        for x in range(0, side, 2 * step):
            d.rectangle((x, 0, x + step - 1, side), fill=light)
    else:
        raise ValueError(f"unknown background {kind!r}; use one of {BACKGROUNDS}")
    return img


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as a size x size RGB image (drawn at 4x, then box-filtered for anti-aliased, crisp edges)."""
    s = SUPERSAMPLE * size / SIZE
    img = _background(scene.background, scene.background_colour, SUPERSAMPLE * size)
    for t in scene.things:
        _paste_thing(img, t, s)
    return img.resize((size, size), Image.Resampling.BOX)


def kind_masks(scene: Scene) -> list[Image.Image]:
    """One binary SIZE x SIZE mask per kind in `KINDS`: where the scene draws an object of that kind."""
    masks = [Image.new("L", (SIZE, SIZE), 0) for _ in KINDS]
    for t in scene.things:
        masks[KINDS.index(t.kind)].paste(255, mask=_mask(t.kind, t.centre[0], t.centre[1], t.radius, SIZE))
    return masks


# ---- captions ------------------------------------------------------------------------------------------------------
def article(word: str) -> str:
    """'an' before a vowel sound, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def decoration_phrase(decorations: tuple[tuple[str, str], ...]) -> str:
    """' with a red dot', ' with a blue outline and green stripes', or ''."""
    parts = []
    for name, colour in decorations:
        parts.append(f"{colour} stripes" if name == "stripes" else f"{article(colour)} {colour} {name}")
    return (" with " + " and ".join(parts)) if parts else ""


def background_phrase(scene: Scene) -> str:
    """' on a blue striped background' (plain backgrounds say only the colour)."""
    kind = "" if scene.background == "plain" else f" {scene.background}"
    return f" on {article(scene.background_colour)} {scene.background_colour}{kind} background"


def caption(scene: Scene) -> str:
    """The scene in DreamBooth's grammar, naming only the attributes in `scene.says`."""
    t = scene.things[0]
    words = [w for w in (scene.size_word, t.colour if "colour" in scene.says else None) if w]
    noun = PLURALS[t.kind] if len(scene.things) == 2 else t.kind
    head = " ".join(words + [noun])
    text = f"a photo of {'two' if len(scene.things) == 2 else article(head)} {head}"
    if "decoration" in scene.says:
        text += decoration_phrase(t.decorations)
    if scene.position_word:
        text += " " + scene.position_word
    if "background" in scene.says:
        text += background_phrase(scene)
    return text


# ---- sampling ------------------------------------------------------------------------------------------------------
def _free_centre(rng: random.Random, radius: float, taken: list[Thing]) -> tuple[float, float]:
    lo, hi = radius + 2, SIZE - radius - 2
    for _ in range(50):
        c = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        if all(math.dist(c, t.centre) > radius + t.radius + 2 for t in taken):
            return c
    return c


def sample_object(rng: random.Random) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(kind, colour, decorations) of a pretraining object: at most one decoration, in another colour."""
    kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
    while (colour, kind) in HELD_OUT_PAIRS:
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
    if rng.random() < 0.35:
        second = rng.choice([c for c in COLOURS if c != colour])
        return kind, colour, ((rng.choice(DECORATIONS), second),)
    return kind, colour, ()


def sample_scene(rng: random.Random, obj: tuple | None = None, p_two: float = 0.15) -> Scene:
    """A random pretraining scene; `obj` = (kind, colour, decorations) fixes the object (as concept photos do)."""
    kind, colour, decorations = obj or sample_object(rng)
    background = rng.choice(BACKGROUNDS)
    background_colour = rng.choice([c for c in COLOURS if c != colour])
    says = {a for a, p in (("colour", 0.92), ("decoration", 0.85), ("background", 0.7)) if rng.random() < p}
    if rng.random() < p_two:
        r = rng.uniform(9, 12)
        things: list[Thing] = []
        for _ in range(2):
            things.append(Thing(kind, colour, decorations, _free_centre(rng, r, things), r))
        return Scene(tuple(things), background, background_colour, None, None, frozenset(says))
    size_word = rng.choice(list(SIZES))
    r = SIZES[size_word] * rng.uniform(0.9, 1.1)
    position_word = None
    if rng.random() < 0.5:
        position_word = rng.choice(list(POSITIONS))
        ax, ay = POSITIONS[position_word]
        lo, hi = r + 1, SIZE - r - 1
        centre = (min(max(ax + rng.uniform(-3, 3), lo), hi), min(max(ay + rng.uniform(-3, 3), lo), hi))
    else:
        centre = _free_centre(rng, r, [])
    shown_size = size_word if (size_word != "medium" and rng.random() < 0.7) else None
    return Scene((Thing(kind, colour, decorations, centre, r),), background, background_colour, shown_size,
                 position_word, frozenset(says))
