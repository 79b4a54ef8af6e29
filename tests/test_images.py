"""One image rule for the trainer, the studio and the evaluation: EXIF rotation, transparency onto white."""
from PIL import Image

from eval.scorer import load_images as eval_images
from loldu_sd.images import to_rgb
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
