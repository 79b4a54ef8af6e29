"""One image rule for the trainer, the studio and the evaluation: EXIF rotation, transparency onto white."""
import io
import os

import pytest
from PIL import EpsImagePlugin, Image

from eval.scorer import load_images as eval_images
from loldu_sd.images import ImageReadError, read_folder, read_image, to_rgb
from loldu_sd.studio.inputs import StudioError
from loldu_sd.studio.inputs import load_images as studio_images
from loldu_sd.training import load_images as training_images


def transparent_rotated_png(path):
    """A 96x64 PNG, left half opaque black and right half fully transparent, with EXIF orientation 6."""
    image = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate 90 degrees clockwise: the opaque half ends on top
    image.save(path, exif=exif)
    return path


def test_to_rgb_handles_every_mode():
    assert to_rgb(Image.new("LA", (4, 4), (10, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I;16", (4, 4), 256 * 200)).getpixel((0, 0)) == (200, 200, 200)
    assert to_rgb(Image.new("RGB", (4, 4), (0, 51, 255)).convert("P")).getpixel((0, 0)) == (0, 51, 255)


def test_trainer_studio_and_eval_read_an_image_alike(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [transparent_rotated_png(folder / f"{i}.png") for i in range(3)]
    loaded = [training_images(folder)[0][0][1], studio_images(paths)[0], eval_images(folder)[0][0]]
    for image in loaded:
        assert image.mode == "RGB" and image.size == (64, 96)
        assert image.getpixel((32, 10)) == (0, 0, 0) and image.getpixel((32, 85)) == (255, 255, 255)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.fixture
def gs_stub(tmp_path, monkeypatch):
    """A fake `gs` first on PATH that leaves a marker file when anything runs it."""
    marker = tmp_path / "gs_ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL caches the lookup: make it look again
    return marker


def photos_with_postscript(folder):
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "vacation.png").write_bytes(EPS)
    return folder


def test_postscript_named_png_never_reaches_ghostscript(tmp_path, gs_stub):
    with pytest.raises((OSError, ValueError)):  # the stub is real: PIL without a format limit does run it
        with Image.open(io.BytesIO(EPS)) as im:
            im.load()
    assert gs_stub.exists()
    gs_stub.unlink()
    folder = photos_with_postscript(tmp_path / "photos")
    vacation = folder / "vacation.png"
    with pytest.raises(ImageReadError, match=r"vacation.png: not a readable image \(PostScript content") as e:
        read_image(vacation)
    assert "\n" not in str(e.value)
    images, notes = training_images(folder)
    assert len(images) == 3 and any("vacation.png: skipped, not a readable image (PostScript" in n for n in notes)
    with pytest.warns(UserWarning, match="vacation.png: skipped"):
        assert len(eval_images(folder)[0]) == 3
    with pytest.raises(StudioError, match="vacation.png: not a readable image"):
        studio_images(sorted(folder.iterdir()))
    assert not gs_stub.exists()


def test_size_and_pixel_limits_are_checked_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (3000, 2000)).save(path)
    with pytest.raises(ImageReadError, match=r"wide.png: not a readable image \(3000x2000 pixels is over the 1-mega"):
        read_image(path, max_pixels=2**20)
    with pytest.raises(ImageReadError, match=r"wide.png: 0.0 MB is over the 0 MB limit"):
        read_image(path, max_bytes=100)
    assert read_image(path).size == (3000, 2000)
    data = path.read_bytes()
    assert read_image(data, name="upload").mode == "RGB"
    with pytest.raises(ImageReadError, match=r"^cut.png: not a readable image"):
        read_image(data[: len(data) // 2], name="cut.png")


def test_a_folder_notes_every_entry_it_skips(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="is empty"):
        read_folder(folder)
    (folder / "sub").mkdir()
    with pytest.raises(ImageReadError, match="holds only subfolders or links"):
        read_folder(folder)
    os.mkfifo(folder / "pipe.png")
    (folder / "bad.png").write_text("x")
    with pytest.raises(ImageReadError, match=r"holds no readable image \(1 file"):
        read_folder(folder)
    Image.new("RGB", (8, 8)).save(folder / "ok.tif")
    images, notes = read_folder(folder)
    assert [p.name for p, _ in images] == ["ok.tif"] and len(notes) == 3
    assert read_folder(folder, (".tif",))[1] == []  # other extensions are ignored silently
