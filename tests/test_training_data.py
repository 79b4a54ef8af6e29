"""Trainer inputs without any model: flags, image folders, deterministic data stream, checkpoint folders, outputs."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from loldu_sd import training
from loldu_sd.training import (
    DreamBoothDataset,
    SampleStream,
    TrainingInputError,
    list_checkpoints,
    load_images,
    parse_args,
    preflight,
    resolve_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def flags(tmp_path, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", str(tmp_path / "inst"),
            "--instance_prompt", "a photo of sks robot", "--output_dir", str(tmp_path / "out"), *extra]


def save(path, image, fmt="PNG", **kw):
    image.save(path, fmt, **kw)
    return path


@pytest.fixture
def inst(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    save(d / "ok.png", Image.new("RGB", (80, 64), (10, 200, 30)))
    return d


# ---- images -------------------------------------------------------------------------------------------------------
def test_modes_are_converted_to_rgb_and_exif_rotation_is_honoured(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red: must come out white
    save(d / "rgba.png", rgba)
    save(d / "gray.png", Image.new("L", (64, 64), 128))
    save(d / "cmyk.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")
    save(d / "palette.png", Image.new("RGB", (64, 64), (0, 0, 255)).convert("P"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned; viewers rotate 90 degrees clockwise
    wide = Image.new("RGB", (96, 64), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 48, 64))  # left half white
    save(d / "rotated.jpg", wide, "JPEG", exif=exif, quality=95)
    images = dict((p.name, im) for p, im in load_images(d, 64)[0])
    assert all(im.mode == "RGB" for im in images.values()) and len(images) == 5
    assert images["rgba.png"].getpixel((5, 5)) == (255, 255, 255)
    assert images["gray.png"].getpixel((5, 5)) == (128, 128, 128)
    r, g, b = images["cmyk.jpg"].getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert images["rotated.jpg"].size == (64, 96)  # portrait after the rotation
    assert images["rotated.jpg"].getpixel((32, 5))[0] > 200 and images["rotated.jpg"].getpixel((32, 90))[0] < 50


def test_corrupt_and_non_image_files_are_skipped_with_a_warning_naming_each(inst):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, "PNG")
    (inst / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (inst / "notes.png").write_text("not an image")
    (inst / "readme.txt").write_text("hello")
    (inst / ".DS_Store").write_bytes(b"\0\0")  # hidden files are ignored silently
    images, warnings = load_images(inst, 64)
    assert [p.name for p, _ in images] == ["ok.png"]
    assert len(warnings) == 4 and "only 1 image(s); DreamBooth needs 3-5 photos" in warnings[-1]
    for name in ("truncated.png", "notes.png", "readme.txt"):
        assert any(name in w and "skipped" in w for w in warnings), name


def test_subfolders_links_fifos_and_too_few_images_are_each_said(inst):
    (inst / "more").mkdir()
    (inst / "gone.png").symlink_to(inst / "deleted.png")
    os.mkfifo(inst / "pipe.png")  # opening it would block
    save(inst / "two.png", Image.new("RGB", (64, 64)))
    images, warnings = load_images(inst, 64)
    assert [p.name for p, _ in images] == ["ok.png", "two.png"]
    assert warnings == [f"{inst / 'gone.png'}: skipped, a dangling symlink",
                        f"{inst / 'more'}: skipped, a subfolder (images in subfolders are not read)",
                        f"{inst / 'pipe.png'}: skipped, not a regular file",
                        f"--instance_data_dir {inst}: only 2 image(s); DreamBooth needs 3-5 photos of the subject "
                        "(from several angles) to learn it rather than copy one picture. Training anyway"]
    save(inst / "three.png", Image.new("RGB", (64, 64)))
    assert len(load_images(inst, 64)[1]) == 3  # 3 images: no warning about their number
    (inst / "three.png").unlink()
    assert not any("only 2 image" in w for w in load_images(inst, 64, "class")[1])  # class images: any number


def test_images_smaller_than_resolution_are_named_in_a_warning(inst):
    save(inst / "tiny.png", Image.new("RGB", (40, 300)))
    save(inst / "z.png", Image.new("RGB", (64, 64)))
    _, warnings = load_images(inst, 64)
    assert len(warnings) == 1
    assert "tiny.png" in warnings[0] and "40x300" in warnings[0] and "--resolution 64" in warnings[0]


@pytest.mark.parametrize("case, match", [
    ("missing", "no such folder"),
    ("file", "is a file"),
    ("empty", "is empty"),
    ("unreadable", r"holds no readable image \(2 file"),
])
def test_unusable_instance_folders_are_one_line_errors(tmp_path, case, match):
    d = tmp_path / "inst"
    if case == "file":
        d.write_text("x")
    elif case != "missing":
        d.mkdir()
    if case == "unreadable":
        (d / "a.png").write_text("x")
        (d / "b.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(TrainingInputError, match=match) as e:
        load_images(d, 64)
    assert "--instance_data_dir" in str(e.value) and "\n" not in str(e.value)


# ---- flags ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["--with_prior_preservation", "--class_prompt", "a robot"], "needs --class_data_dir"),
    (["--with_prior_preservation", "--class_data_dir", "c"], "needs --class_prompt"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
    (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (["--resolution", "60"], "multiple of 8"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--alpha", "64", "--rank", "32"], "sigma0 = alpha/rank = 2"),
    (["--target_modules", " , "], "--target_modules is empty"),
    (["--report_to", "nowhere"], "--report_to must be"),
    (["--resume_from_checkpoint", ""], "--resume_from_checkpoint is empty"),
    (["--seed", "-1"], r"--seed must be between 0 and 2\*\*32 - 1, got -1"),
    (["--seed", str(2**32)], "--seed must be between 0"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--adam_epsilon", "inf"], "--adam_epsilon must be a finite number"),
    (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number"),
    (["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", " "], "needs --class_prompt"),
    (["--validation_prompt", " "], "--validation_prompt is empty"),
    (["--output_dir", ""], "--output_dir is empty"),  # was: trained into the current folder, over its README.md
    (["--output_dir", "  "], "--output_dir is empty"),
    (["--alpha", "nan"], "--alpha must be a finite number > 0, got nan"),  # was: failed at step 1 blaming the lr
    (["--alpha", "nan", "--sigma_max", "none"], "--alpha must be a finite number > 0, got nan"),
    (["--sigma_max", "nan"], "--sigma_max must be a finite number > 0"),
    (["--z_max_norm", "inf"], "--z_max_norm must be a finite number > 0"),
])
def test_contradictory_or_out_of_range_flags_are_one_line_errors(tmp_path, extra, match):
    with pytest.raises(TrainingInputError, match=match) as e:
        parse_args(flags(tmp_path, *extra))
    assert "\n" not in str(e.value)


def test_defaults_follow_the_paper(tmp_path):
    args = parse_args(flags(tmp_path))
    assert (args.learning_rate, args.rank, training.loldu_config(args).alpha, args.lr_scheduler,
            args.lr_warmup_steps) == (5e-4, 32, 32.0, "constant_with_warmup", 15)
    # alpha defaults to the rank, so any --rank keeps sigma0 = 1 within the projection bound
    assert training.loldu_config(parse_args(flags(tmp_path, "--rank", "4"))).sigma0 == 1.0
    assert (args.adam_weight_decay, args.seed, args.resolution, args.train_batch_size) == (1e-2, 42, 512, 1)
    assert args.train_sigma and args.sigma_max == 1.0 and args.z_max_norm is None and args.report_to == "tensorboard"
    assert training.resolve_max_train_steps(args, 5, 1) == training.DEFAULT_MAX_TRAIN_STEPS == 200
    cfg = training.loldu_config(parse_args(flags(tmp_path, "--no-train_sigma", "--sigma_max", "none",
                                                 "--target_modules", "to_q,to_v", "--init", "uniform")))
    assert (cfg.train_sigma, cfg.sigma_max, cfg.target_modules, cfg.init) == (False, None, ["to_q", "to_v"], "uniform")
    epochs = parse_args(flags(tmp_path, "--num_train_epochs", "3", "--train_batch_size", "2"))
    assert training.resolve_max_train_steps(epochs, 5, 1) == 9  # 3 epochs x ceil(5 / 2)


def test_preflight_catches_environment_and_folder_problems(tmp_path, inst, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingInputError, match="--output_dir .*not writable"):
        preflight(parse_args(flags(tmp_path, "--output_dir", str(blocker / "out"))))
    with pytest.raises(TrainingInputError, match="--resume_from_checkpoint checkpoint-7: no such checkpoint"):
        preflight(parse_args(flags(tmp_path, "--resume_from_checkpoint", "checkpoint-7")))
    preflight(parse_args(flags(tmp_path, "--resume_from_checkpoint", "latest")))  # none yet: starts fresh
    for flag in ("--pretrained_model_name_or_path", "--pretrained_vae_model_name_or_path", "--tokenizer_name"):
        with pytest.raises(TrainingInputError, match=f"^{flag} .*nope: no such folder"):
            preflight(parse_args(flags(tmp_path, flag, str(tmp_path / "nope"))))
    with pytest.raises(TrainingInputError, match="--instance_data_dir and --output_dir are the same folder"):
        preflight(parse_args(flags(tmp_path, "--output_dir", str(inst) + "/")))
    with pytest.raises(TrainingInputError, match="--instance_data_dir and --class_data_dir are the same folder"):
        preflight(parse_args(flags(tmp_path, "--with_prior_preservation", "--class_prompt", "a robot",
                                   "--class_data_dir", str(inst))))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(TrainingInputError, match="--use_8bit_adam needs bitsandbytes: pip install bitsandbytes"):
        preflight(parse_args(flags(tmp_path, "--use_8bit_adam")))
    with pytest.raises(TrainingInputError, match="needs xformers: pip install xformers"):
        preflight(parse_args(flags(tmp_path, "--enable_xformers_memory_efficient_attention")))
    with pytest.raises(TrainingInputError, match="--report_to wandb needs wandb: pip install wandb"):
        preflight(parse_args(flags(tmp_path, "--report_to", "wandb")))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingInputError, match="fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16"):
        preflight(parse_args(flags(tmp_path, "--mixed_precision", "fp16")))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(TrainingInputError, match="--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE"):
        preflight(parse_args(flags(tmp_path, "--push_to_hub")))


@pytest.mark.slow
def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_loldu.py"), *flags(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train_dreambooth_loldu.py: error: --instance_data_dir {tmp_path / 'inst'}: no such folder"]


# ---- the deterministic data stream ---------------------------------------------------------------------------------
def test_dataset_sample_n_is_the_same_everywhere_and_streams_shard_the_global_batch():
    images = [Image.new("RGB", (96, 80), (40 * i, 100, 200 - 30 * i)) for i in range(5)]
    ds = DreamBoothDataset(images, 64, seed=42, random_flip=True, class_images=images[:2])
    again = DreamBoothDataset(images, 64, seed=42, random_flip=True, class_images=images[:2])
    assert len(ds) == 5 and ds[0]["instance"].shape == (3, 64, 64)
    assert all(torch.equal(ds[n]["instance"], again[n]["instance"]) for n in range(12))
    assert not torch.equal(ds[0]["instance"], ds[1]["instance"])
    # each epoch visits every image once, in a seeded order
    colours = [tuple(ds[n]["instance"][:, 0, 0].tolist()) for n in range(10)]
    assert len(set(colours[:5])) == 5 and set(colours[:5]) == set(colours[5:])
    assert ds[3]["instance"].min() >= -1 and ds[3]["instance"].max() <= 1

    def take(stream, k):
        it = iter(stream)
        return [next(it) for _ in range(k)]

    # 1 process x batch 2 sees exactly the samples of 2 processes x batch 1, micro-batch by micro-batch
    one = take(SampleStream(3, world=1, rank=0, batch_size=2), 4)
    two = [take(SampleStream(3, world=2, rank=r, batch_size=1), 2) for r in (0, 1)]
    assert one == [6, 7, 8, 9] and two == [[6, 8], [7, 9]]


def test_samples_carry_sdxl_size_conditioning_of_their_crop():
    image = Image.new("RGB", (160, 100))  # resized to 102 x 64, then cropped to 64 x 64
    image.paste((255, 0, 0), (0, 0, 160, 100))
    for center in (True, False):
        ds = DreamBoothDataset([image], 64, seed=1, center_crop=center, class_images=[image])
        for n in range(4):
            h, w, top, left, th, tw = ds[n]["instance_time_ids"].tolist()
            assert (h, w, th, tw, top) == (100, 160, 64, 64, 0) and 0 <= left <= 102 - 64
            assert ds[n]["class_time_ids"].shape == (6,)
        if center:
            assert left == (102 - 64) // 2


def test_sample_seed_streams_are_independent():
    seeds = {training.sample_seed(42, s, 0, n) for s in range(3) for n in range(100)}
    assert len(seeds) == 300 and training.sample_seed(42, 1, 0, 7) == training.sample_seed(42, 1, 0, 7)


# ---- checkpoint folders --------------------------------------------------------------------------------------------
def test_latest_ignores_temp_and_incomplete_checkpoints_and_interrupted_renames_are_undone(tmp_path):
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12.tmp-ab12", True),
                           ("checkpoint-11", False), ("checkpoint-12.old-ff00", True), ("other", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / training.STATE_NAME).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    assert resolve_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-10")) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint(tmp_path, "checkpoint-11") is None  # no training_state.json: incomplete
    training.checkpoints.clean_interrupted_saves(tmp_path)
    # the tmp folder is gone; the .old one was the only copy of checkpoint-12, so it is put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11", "checkpoint-12",
                                                          "checkpoint-2", "other"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-12"
    assert list_checkpoints(tmp_path / "missing") == []


# ---- outputs -------------------------------------------------------------------------------------------------------
def test_grid_and_loss_plot(tmp_path):
    grid = training.image_grid([Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)])
    assert grid.size == (32, 16) and grid.getpixel((9, 1)) == (40, 0, 0)
    path = training.plot_losses([(i, 1 / i) for i in range(1, 30)], tmp_path / "loss.png")
    with Image.open(path) as im:
        assert im.size == (600, 350)


def test_resuming_with_other_loldu_flags_is_refused_before_loading_models(tmp_path, tiny_net):
    from loldu_sd import LoLDUConfig, add_loldu
    from loldu_sd.diffusers import save_pipeline_adapter

    ckpt = tmp_path / "out" / "checkpoint-4"
    net = add_loldu(tiny_net(), LoLDUConfig(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    save_pipeline_adapter(ckpt, {"unet": net})
    (ckpt / training.STATE_NAME).write_text('{"global_step": 4, "losses": []}')
    ok = parse_args(flags(tmp_path, "--rank", "4", "--alpha", "4", "--resume_from_checkpoint", "latest"))
    preflight(ok)
    for extra in (["--rank", "8", "--alpha", "8"], ["--rank", "4", "--alpha", "4", "--train_text_encoder"]):
        with pytest.raises(TrainingInputError, match=r"checkpoint-4: trained with other LoLDU flags \(rank 4, "):
            preflight(parse_args(flags(tmp_path, *extra, "--resume_from_checkpoint", "checkpoint-4")))


def test_pickles_are_recognised_by_name_or_first_bytes_and_rng_state_needs_its_process(tmp_path):
    from types import SimpleNamespace

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "training_state.json").write_text("{}")
    (folder / "notes.txt").write_text("plain text")
    training.checkpoints.refuse_pickles(folder)  # nothing pickled: accepted
    for name, data in (("scheduler.pt", b"anything"), ("notes.txt", b"\x80\x04K\x01."), ("state", b"PK\x03\x04")):
        (folder / name).write_bytes(data)
        with pytest.raises(TrainingInputError, match=f"holds {name}, a pickle file"):
            training.checkpoints.refuse_pickles(folder)
        (folder / name).unlink()
    accelerator = SimpleNamespace(process_index=1, step=0)
    with pytest.raises(TrainingInputError, match="no random_states_1.json; .*same number of processes"):
        training.checkpoints.load_rng_state(folder, accelerator)
