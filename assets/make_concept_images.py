"""Render the sample concept: five "photos" of one toy robot, for DreamBooth-style demos and tests.

The robot: teal body with a chest panel, orange head with one big yellow eye, a red ball on its antenna, grey arms
and dark feet. Each view changes the turn of the robot (a side face shows), its size, position, tilt and the
background tint, so the set looks like five shots of the same object. PIL only and seeded: rerunning writes
byte-identical files.

    python assets/make_concept_images.py            # writes assets/concept/00.png .. 04.png
    python assets/make_concept_images.py --out DIR
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 256  # output side in pixels
SS = 4  # supersampling: draw at 4x, then downsample, for smooth edges
C = SIZE * SS  # canvas side while drawing

TEAL, TEAL_SIDE, TEAL_LIGHT = (0, 150, 145), (0, 105, 102), (70, 195, 185)
ORANGE, ORANGE_SIDE = (240, 128, 30), (185, 90, 15)
YELLOW, RED, GREY, DARK = (255, 215, 40), (215, 30, 40), (150, 155, 160), (55, 60, 70)

# (turn in degrees, scale, x offset, y offset, tilt in degrees, background tint) per view
VIEWS = [
    (0, 0.92, 0.00, 0.02, 0, (236, 226, 205)),  # straight on, beige
    (28, 0.80, -0.10, 0.05, 4, (205, 222, 238)),  # turned right, smaller, light blue
    (-24, 0.98, 0.08, 0.00, -5, (222, 222, 222)),  # turned left, larger, grey
    (14, 0.70, 0.12, 0.10, -2, (214, 234, 210)),  # small, off-centre, pale green
    (-36, 0.86, -0.06, 0.03, 7, (230, 215, 235)),  # strong left turn, lavender
]


def rounded_box(draw: ImageDraw.ImageDraw, cx: float, y0: float, y1: float, w: float, depth: float, turn: float,
                front: tuple, side: tuple, radius: float) -> tuple[float, float]:
    """A box seen at `turn` radians: narrowed front face plus a visible side face; returns the front's x span."""
    fw = w * math.cos(turn)
    sw = depth * math.sin(abs(turn))
    shift = depth / 2 * math.sin(turn)  # the front face slides toward the side we turn to
    x0, x1 = cx - fw / 2 + shift, cx + fw / 2 + shift
    if sw > 1:
        # side face beside the front edge we turn away from; its far edge is a little shorter (perspective)
        edge = x0 if turn > 0 else x1
        back = edge - sw if turn > 0 else edge + sw
        shrink = sw * 0.12
        draw.polygon([(edge, y0 + radius / 3), (back, y0 + radius / 3 + shrink), (back, y1 - radius / 3 - shrink),
                      (edge, y1 - radius / 3)], fill=side)
    draw.rounded_rectangle([x0, y0, x1, y1], radius=radius, fill=front)
    return x0, x1


def draw_robot(turn_deg: float) -> Image.Image:
    """The robot on a transparent C x C layer, feet at the bottom centre, turned by turn_deg."""
    layer = Image.new("RGBA", (C, C), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    t = math.radians(turn_deg)
    k = math.cos(t)
    cx = C / 2
    u = C / 256  # one unit = one output pixel at scale 1

    # feet and legs
    for side in (-1, 1):
        lx = cx + side * 34 * u * k
        d.rounded_rectangle([lx - 12 * u, 190 * u, lx + 12 * u, 228 * u], radius=5 * u, fill=GREY)
        d.ellipse([lx - 24 * u, 220 * u, lx + 24 * u, 240 * u], fill=DARK)
    # arms (behind the body), with round grippers
    for side in (-1, 1):
        ax = cx + side * 70 * u * k
        d.rounded_rectangle([ax - 10 * u, 128 * u, ax + 10 * u, 182 * u], radius=9 * u, fill=GREY)
        d.ellipse([ax - 14 * u, 176 * u, ax + 14 * u, 200 * u], fill=DARK)
    # body with chest panel and three buttons
    bx0, bx1 = rounded_box(d, cx, 118 * u, 198 * u, 116 * u, 70 * u, t, TEAL, TEAL_SIDE, 14 * u)
    pc, pw = (bx0 + bx1) / 2, (bx1 - bx0) * 0.55
    d.rounded_rectangle([pc - pw / 2, 136 * u, pc + pw / 2, 176 * u], radius=6 * u, fill=TEAL_LIGHT)
    for i, colour in enumerate((RED, YELLOW, (255, 255, 255))):
        bx = pc + (i - 1) * pw * 0.3
        d.ellipse([bx - 5 * u, 150 * u, bx + 5 * u, 160 * u], fill=colour)
    # neck, then head
    d.rectangle([cx - 12 * u * k, 106 * u, cx + 12 * u * k, 122 * u], fill=DARK)
    hx0, hx1 = rounded_box(d, cx, 44 * u, 110 * u, 104 * u, 64 * u, t, ORANGE, ORANGE_SIDE, 16 * u)
    hc = (hx0 + hx1) / 2
    # antenna: stalk from the head's top, red ball with a highlight
    d.line([(hc, 46 * u), (hc + 4 * u * math.sin(t), 18 * u)], fill=DARK, width=int(4 * u))
    bxc = hc + 4 * u * math.sin(t)
    d.ellipse([bxc - 11 * u, 6 * u, bxc + 11 * u, 28 * u], fill=RED)
    d.ellipse([bxc - 6 * u, 10 * u, bxc - 1 * u, 15 * u], fill=(255, 170, 170))
    # one big yellow eye: black rim, pupil looking where the robot turns, white glint
    ew, eh = 30 * u * k, 30 * u
    ex = hc + 6 * u * math.sin(t)
    d.ellipse([ex - ew - 3 * u, 77 * u - eh - 3 * u, ex + ew + 3 * u, 77 * u + eh + 3 * u], fill=DARK)
    d.ellipse([ex - ew, 77 * u - eh, ex + ew, 77 * u + eh], fill=YELLOW)
    px, pr = ex + 8 * u * math.sin(t), 11 * u
    d.ellipse([px - pr * k, 77 * u - pr, px + pr * k, 77 * u + pr], fill=DARK)
    d.ellipse([px - 6 * u, 69 * u, px - 1 * u, 74 * u], fill=(255, 255, 255))
    return layer


def background(tint: tuple, rng: random.Random) -> Image.Image:
    """A wall (tint, lighter at the top) meeting a slightly darker floor at a jittered horizon."""
    bg = Image.new("RGB", (C, C))
    d = ImageDraw.Draw(bg)
    horizon = int(C * rng.uniform(0.55, 0.68))
    for y in range(0, C, SS):
        f = 1.06 - 0.12 * y / C if y < horizon else 0.80 + 0.08 * (y - horizon) / (C - horizon)
        d.rectangle([0, y, C, y + SS - 1], fill=tuple(min(255, int(c * f)) for c in tint))
    return bg


def render(view: tuple, rng: random.Random) -> Image.Image:
    """One SIZE x SIZE photo of the robot for a VIEWS entry."""
    turn, scale, dx, dy, tilt, tint = view
    img = background(tint, rng)
    robot = draw_robot(turn).rotate(tilt, resample=Image.BICUBIC, center=(C / 2, C * 0.93))
    side = int(C * scale)
    robot = robot.resize((side, side), Image.LANCZOS)
    x = int(C / 2 - side / 2 + dx * C + rng.uniform(-0.01, 0.01) * C)
    y = int(C * 0.97 - side + dy * C)
    # soft contact shadow under the feet
    shadow = Image.new("L", (C, C), 0)
    fy = y + side * 0.92
    ImageDraw.Draw(shadow).ellipse([C / 2 + dx * C - side * 0.26, fy - side * 0.03,
                                    C / 2 + dx * C + side * 0.26, fy + side * 0.05], fill=110)
    img.paste((40, 40, 45), (0, 0), shadow.filter(ImageFilter.GaussianBlur(6 * SS)))
    img.paste(robot, (x, y), robot)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def main(argv: list[str] | None = None) -> None:
    """Write 00.png .. 04.png into --out (default: assets/concept next to this script)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "concept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i, view in enumerate(VIEWS):
        render(view, rng).save(args.out / f"{i:02d}.png", optimize=True)
    print(f"wrote {len(VIEWS)} images to {args.out}")


if __name__ == "__main__":
    main()
