"""The one image reader: every image file that enters loldu-sd (folders, paths, uploads, library samples) goes here.

Only formats PIL decodes in-process are opened (`IMAGE_FORMATS`): PIL would hand EPS/PDF content to Ghostscript,
whatever the file is called. Files are size- and pixel-checked before decoding, decoded fully (a truncated file fails
here, not later) and returned as RGB with EXIF rotation applied and transparency onto white.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # all decoded by PIL itself, no external program
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_BYTES = 64 * 2**20
MAX_PIXELS = 64 * 2**20  # about 8000 x 8000: a 48-megapixel phone photo fits, a decompression bomb does not
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
_SHELL_OUT = {b"%!PS": "PostScript", b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF"}


class ImageReadError(ValueError):
    """A file is not an image loldu-sd reads; the message is one line naming the file."""


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


def _file_bytes(path: Path, label: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (checked before reading: a FIFO would block)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(f"{label}: not a regular file")
        if info.st_size > max_bytes:
            raise ImageReadError(f"{label}: {info.st_size / 2**20:.1f} MB is over the {max_bytes // 2**20} MB "
                                 "limit per image")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise ImageReadError(f"{label}: cannot be read ({e.strerror or e})") from None


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode `data` with the allowed formats only; OSError/ValueError-family on any problem."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{im.width}x{im.height} pixels is over the {max_pixels / 2**20:.0f}-megapixel limit")
            im.verify()  # structure and checksums; PIL needs the image reopened afterwards
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            im.load()
            return to_rgb(im)


def read_image(source: str | Path | bytes, name: str | None = None, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One image file (or its bytes) as RGB; ImageReadError naming `name` (default: the path) on any problem."""
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    data = source if isinstance(source, bytes) else _file_bytes(Path(source), label, max_bytes)
    if len(data) > max_bytes:
        raise ImageReadError(f"{label}: {len(data) / 2**20:.1f} MB is over the {max_bytes // 2**20} MB limit per image")
    kind = next((k for magic, k in _SHELL_OUT.items() if data.lstrip()[:4] == magic), None)
    if kind:  # said plainly: the formats= limit refuses it too, but "cannot identify" would not say why
        raise ImageReadError(f"{label}: not a readable image ({kind} content, which loldu-sd never decodes: it "
                             f"would need Ghostscript); use {_FORMAT_NAMES} files")
    try:
        return _decode(data, max_pixels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = f"not {_FORMAT_NAMES} content" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise ImageReadError(f"{label}: not a readable image ({reason}); use {_FORMAT_NAMES} files") from None


def _not_a_file(path: Path) -> str:
    """Why a folder entry is not read as an image."""
    if path.is_symlink() and not path.exists():
        return "a dangling symlink"
    if path.is_dir():
        return "a subfolder (images in subfolders are not read)"
    return "not a regular file"


def read_folder(folder: str | Path, extensions: tuple[str, ...] | None = None
                ) -> tuple[list[tuple[Path, Image.Image]], list[str]]:
    """(path, RGB image) pairs of a folder's files in name order, and one note per entry skipped and why.

    Hidden files are ignored; with `extensions`, so are files with other suffixes. ImageReadError when the folder
    is missing, a file, or yields no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageReadError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: is a file, not a folder of images")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if extensions is not None:
        entries = [p for p in entries if p.suffix.lower() in extensions]
    files = [p for p in entries if p.is_file()]  # regular files (or links to them) only: a FIFO would block
    notes = [f"{p}: skipped, {_not_a_file(p)}" for p in entries if p not in files]
    images = []
    for path in files:
        try:
            images.append((path, read_image(path)))
        except ImageReadError as e:
            notes.append(f"{path}: skipped, {str(e).removeprefix(f'{path}: ')}")
    if not images:
        if files:
            raise ImageReadError(f"{folder}: holds no readable image ({len(files)} file(s) skipped; {files[0].name}: "
                                 f"{notes[-len(files)].split(', ', 1)[1]})")
        raise ImageReadError(f"{folder}: {'holds only subfolders or links' if notes else 'is empty'}")
    return images, notes
