"""The one image loader rule shared by the trainer, the studio and the evaluation: what RGB an image file means."""
from __future__ import annotations

from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image: EXIF rotation applied, transparency onto white, every mode (CMYK, 16-bit...)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale down to 8 bits first
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
