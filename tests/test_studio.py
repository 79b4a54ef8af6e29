"""The studio logic behind app.py: names, uploads, library, generation with mixed adapters, import, export, jobs."""
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from loldu_sd import LoLDUConfig, save_loldu
from loldu_sd.studio import (
    WEIGHT_NAME,
    AdapterLibrary,
    CompareRequest,
    GenerateRequest,
    StudioError,
    TrainingJob,
    TrainRequest,
    check_range,
    load_images,
    sanitize_name,
    suggest_instance_prompt,
)


def png(path: Path, color=(200, 30, 30), size=(32, 32)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    return [png(tmp_path / f"img{i}.png", (40 * i, 100, 200)) for i in range(3)]


def tiny_adapter(path: Path, tiny_net, rank=2, base="tiny-net") -> Path:
    from loldu_sd import add_loldu

    net = add_loldu(tiny_net(), LoLDUConfig(rank=rank, target_modules=["to_q", "to_v"]), "default")
    return save_loldu(path, net, metadata={"base_model": base})


# ---- names, ranges, prompts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, clean", [("my robot", "my_robot"), ("../../etc/passwd", "etc_passwd"),
                                        ("  dög-1 ", "d_g-1"), ("a" * 100, "a" * 64), ("C:\\x\\y", "C_x_y")])
def test_sanitize_name(raw, clean):
    assert sanitize_name(raw) == clean


@pytest.mark.parametrize("raw", ["", "   ", "../..", "///", None])
def test_sanitize_name_rejects_empty(raw):
    with pytest.raises(StudioError, match="adapter name"):
        sanitize_name(raw)


def test_check_range_and_prompt_suggestion():
    assert check_range("steps", "12", (1, 20), integer=True) == 12
    for bad in (0, 21, 2.5, "x", float("nan")):
        with pytest.raises(StudioError, match="steps"):
            check_range("steps", bad, (1, 20), integer=True)
    assert suggest_instance_prompt(" teddy  bear ") == "a photo of sks teddy bear"
    assert suggest_instance_prompt("") == "a photo of sks object"


# ---- uploads ---------------------------------------------------------------------------------------------------
def test_load_images_decodes_by_content_not_extension(tmp_path, images):
    disguised = tmp_path / "photo.txt"  # a real PNG with a wrong extension is fine
    disguised.write_bytes(images[0].read_bytes())
    out = load_images([*images[1:], disguised])
    assert len(out) == 3 and all(im.mode == "RGB" for im in out)
    fake = tmp_path / "fake.png"  # text with an image extension is not
    fake.write_text("definitely not a png")
    with pytest.raises(StudioError, match="fake.png: not a readable image"):
        load_images([*images[:2], fake])


def test_load_images_rejects_truncated_count_and_size(tmp_path, images):
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(images[0].read_bytes()[:60])
    with pytest.raises(StudioError, match="trunc.png"):
        load_images([*images[:2], trunc])
    with pytest.raises(StudioError, match="at least 3"):
        load_images(images[:2])
    with pytest.raises(StudioError, match="at most 10"):
        load_images(images * 4)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # 21 MB: rejected before decoding
        f.write(images[0].read_bytes())
        f.truncate(21 * 2**20)
    with pytest.raises(StudioError, match="big.png: 21.0 MB is over the 20 MB"):
        load_images([*images[:2], big])


def test_load_images_refuses_formats_pil_would_shell_out_for(tmp_path, images):
    eps = tmp_path / "x.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(StudioError, match="x.png: not a readable image"):
        load_images([*images[:2], eps])


def test_load_images_applies_exif_rotation(tmp_path, images):
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_images([*images[:2], tmp_path / "rot.jpg"])[2].size == (20, 40)


# ---- requests ---------------------------------------------------------------------------------------------------
def test_train_request_validation(tmp_path, images):
    ok = TrainRequest(images=[str(p) for p in images], instance_prompt=" a photo of  sks robot ", name="my robot",
                      steps=2, rank=4)
    assert len(ok.validate()) == 3 and ok.name == "my_robot" and ok.instance_prompt == "a photo of sks robot"
    for change, msg in [({"instance_prompt": "  "}, "instance prompt is empty"), ({"steps": 0}, "training steps"),
                        ({"steps": 10**6}, "training steps"), ({"rank": 0}, "rank"),
                        ({"learning_rate": 5.0}, "learning rate"), ({"name": "!!"}, "adapter name"),
                        ({"batch_size": 0}, "batch size"),
                        ({"images": [str(images[0])]}, "at least 3")]:
        req = TrainRequest(**{**ok.__dict__, **change})
        with pytest.raises(StudioError, match=msg):
            req.validate()


def test_generate_request_validation():
    req = GenerateRequest(" hi ", [("a", 1.0), ("", 0.5), ("b", 0.0)], steps="3").validated()
    assert req.prompt == "hi" and req.adapters == [("a", 1.0)] and req.steps == 3
    for kw, msg in [({"prompt": " "}, "prompt is empty"), ({"steps": 0}, "steps"), ({"guidance": 99}, "guidance"),
                    ({"num_images": 9}, "number of images"), ({"adapters": [("a", 1), ("a", 2)]}, "picked twice"),
                    ({"adapters": [("a", 5.0)]}, "weight of a"), ({"seed": -1}, "seed")]:
        with pytest.raises(StudioError, match=msg):
            GenerateRequest(**{"prompt": "x", **kw}).validated()


def test_compare_request_validation():
    req = CompareRequest(" hi ", ["a", "", "b"], steps="3").validated()
    assert req.prompt == "hi" and req.adapters == ["a", "b"] and req.include_base and req.steps == 3
    for kw, msg in [({"prompt": " "}, "prompt is empty"), ({"adapters": ["a", "a"]}, "picked twice"),
                    ({"adapters": [f"c{i}" for i in range(9)]}, "at most 8 concepts"),
                    ({"include_base": False}, "nothing to compare"), ({"guidance": -1}, "guidance")]:
        with pytest.raises(StudioError, match=msg):
            CompareRequest(**{"prompt": "x", **kw}).validated()


# ---- library ----------------------------------------------------------------------------------------------------
def test_library_add_list_rename_delete(tmp_path, tiny_net):
    lib = AdapterLibrary(tmp_path / "lib")
    src = tiny_adapter(tmp_path / "a.safetensors", tiny_net, rank=2)
    info = lib.add("first one", src, Image.new("RGB", (8, 8)), extra={"instance_prompt": "a photo of sks x"})
    assert info.name == "first_one" and info.rank == 2 and info.base_model == "tiny-net"
    assert info.size_kb == pytest.approx(src.stat().st_size / 1024) and info.sample is not None
    assert info.instance_prompt == "a photo of sks x" and len(info.created_str) == 16
    lib.add("second", src, extra={"created": info.created + 1})  # a later time, stated rather than waited for
    assert [a.name for a in lib.list()] == ["second", "first_one"]  # newest first
    with pytest.raises(StudioError, match="already exists"):
        lib.add("second", src)
    with pytest.raises(StudioError, match="already exists"):
        lib.rename("first_one", "second")
    assert lib.rename("first_one", "renamed").name == "renamed"
    lib.delete("renamed")
    assert lib.names() == ["second"]
    with pytest.raises(StudioError, match="no adapter named"):
        lib.delete("renamed")
    dl = lib.copy_out("second", tmp_path / "dl")
    assert dl.name == "second.safetensors" and dl.read_bytes() == src.read_bytes()


def test_library_paths_stay_inside(tmp_path, tiny_net):
    lib = AdapterLibrary(tmp_path / "lib")
    outside = tmp_path / "secret"
    outside.mkdir()
    tiny_adapter(outside / WEIGHT_NAME, tiny_net)
    assert lib.path("../secret").parent == lib.root  # sanitised to a plain child name
    (lib.root / "link").symlink_to(outside)  # a symlink planted in the library is not followed out
    with pytest.raises(StudioError, match="outside the library"):
        lib.info("link")
    assert "link" not in lib.names() and lib.scan() == ([], ["skipped 'link': a symlink (the studio never follows "
                                                              "links out of the library folder)"])
    (lib.root / ".jobs").mkdir()
    assert ".jobs" not in lib.names()


def test_library_skips_broken_entries(tmp_path, tiny_net):
    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("good", tiny_adapter(tmp_path / "a.safetensors", tiny_net))
    (lib.root / "broken").mkdir()
    (lib.root / "broken" / WEIGHT_NAME).write_bytes(b"garbage")
    (lib.root / "good" / "info.json").write_text("{not json")  # a bad sidecar falls back to file times
    assert [a.name for a in lib.list()] == ["good"]


def test_symlinked_sidecars_and_working_folders_are_never_followed_out(tmp_path, tiny_net):
    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("good", tiny_adapter(tmp_path / "a.safetensors", tiny_net), Image.new("RGB", (8, 8)))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"instance_prompt": "SECRET"}')
    png(outside / "secret.png")
    folder = lib.root / "good"
    for name, target in (("info.json", "secret.json"), ("sample.png", "secret.png")):
        (folder / name).unlink()
        (folder / name).symlink_to(outside / target)
    info = lib.info("good")
    assert "SECRET" not in info.instance_prompt and info.sample is None and lib.sample_image(info) is None
    lib.set_sample("good", Image.new("RGB", (8, 8), (1, 2, 3)))  # replaces the symlink, never writes through it
    assert not (folder / "sample.png").is_symlink() and (outside / "secret.png").read_bytes() == png(
        tmp_path / "same.png").read_bytes()
    for hidden in (".jobs", ".class_images"):
        (lib.root / hidden).symlink_to(outside, target_is_directory=True)
        with pytest.raises(StudioError, match=f"{hidden} in the library folder is a symlink"):
            lib.private_dir(hidden, "x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.json", "secret.png"]


def test_one_broken_adapter_folder_or_sample_is_skipped_with_a_note(tmp_path, tiny_net):
    lib = AdapterLibrary(tmp_path / "lib")
    src = tiny_adapter(tmp_path / "a.safetensors", tiny_net)
    lib.add("good", src, Image.new("RGB", (64, 64), (9, 90, 200)))
    lib.add("torn", src, Image.new("RGB", (64, 64), (9, 90, 200)))
    sample = lib.root / "torn" / "sample.png"
    sample.write_bytes(sample.read_bytes()[:-40])  # truncated: PIL fails only when decoding the pixels
    (lib.root / "unreadable").mkdir()
    (lib.root / "unreadable" / WEIGHT_NAME).write_bytes(b"garbage")
    infos, notes = lib.scan()
    assert sorted(a.name for a in infos) == ["good", "torn"] and len(notes) == 1 and "'unreadable'" in notes[0]
    assert [lib.sample_image(a) is None for a in sorted(infos, key=lambda a: a.name)] == [False, True]


@pytest.mark.parametrize("info, config_rank", [
    ('{"created": "abc"}', None), ('{"created": 1e300}', None), ('{"created": -5, "note": ["x"]}', None),
    ('{"instance_prompt": ' + "[" * 100000 + "]" * 100000 + "}", None),  # RecursionError in json.loads
    ("{}", "Infinity"), ("{}", '"thirty"'),
])
def test_bad_info_json_or_config_fields_never_break_the_library_tab(tmp_path, tiny_net, info, config_rank):
    lib = AdapterLibrary(tmp_path / "lib")
    src = tiny_adapter(tmp_path / "a.safetensors", tiny_net)
    if config_rank is not None:
        with safe_open(str(src), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        meta["config"] = meta["config"].replace('"rank":2', f'"rank":{config_rank}')
        save_file(tensors, str(src), metadata=meta)
    lib.add("odd", src)
    (lib.root / "odd" / "info.json").write_text(info)
    infos, notes = lib.scan()
    assert [a.name for a in infos] == ["odd"] and notes == []
    odd = infos[0]
    assert odd.created == (lib.root / "odd" / WEIGHT_NAME).stat().st_mtime and odd.created_str[:2] == "20"
    assert odd.rank == (None if config_rank else 2) and odd.note == ""


def test_fifo_and_oversized_sidecars_are_ignored_without_hanging(tmp_path, tiny_net):
    import os

    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("x", tiny_adapter(tmp_path / "a.safetensors", tiny_net), extra={"instance_prompt": "kept"})
    folder = lib.root / "x"
    (folder / "info.json").unlink()
    os.mkfifo(folder / "info.json")  # reading it would block forever
    os.mkfifo(folder / "sample.png")
    info = lib.info("x")
    assert info.instance_prompt == "" and info.sample is None
    (folder / "info.json").unlink()
    (folder / "info.json").write_text('{"instance_prompt": "big", "pad": "' + "x" * 2**21 + '"}')
    assert lib.info("x").instance_prompt == ""  # over 1 MB: not ours, ignored


def test_racing_sessions_and_a_read_only_library_get_one_line(tmp_path, tiny_net, monkeypatch):
    import errno
    import os

    lib = AdapterLibrary(tmp_path / "lib")
    src = tiny_adapter(tmp_path / "a.safetensors", tiny_net)
    lib.add("a", src)
    real = os.rename

    def gone(a, b):  # another studio process renamed or deleted the folder in between
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(a))

    monkeypatch.setattr(os, "rename", gone)
    for call in (lambda: lib.rename("a", "b"), lambda: lib.delete("a")):
        with pytest.raises(StudioError, match=r"^could not (rename|delete) 'a': No such file or directory \("):
            call()
    assert lib.names() == ["a"]  # the claimed name 'b' was given back

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "rename", real)
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(StudioError, match=r"^could not add 'c' to the library: Permission denied \(.*read-only"):
        lib.add("c", src)
    monkeypatch.undo()
    (lib.root / "d").mkdir()  # another process claimed 'd' first
    with pytest.raises(StudioError, match="an adapter named 'd' already exists"):
        lib.add("d", src)
    assert lib.names() == ["a"]


def test_the_library_table_shows_the_newest_rows_of_a_huge_library(tmp_path, tiny_net):
    pytest.importorskip("gradio")
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from app import LIBRARY_ROWS, library_html

    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("first", tiny_adapter(tmp_path / "a.safetensors", tiny_net))
    for i in range(LIBRARY_ROWS + 5):  # copies of one folder: what add() writes, without its per-call cost
        shutil.copytree(lib.root / "first", lib.root / f"n{i:04d}")
    page = library_html(lib)
    assert page.count("<tr data-adapter=") == LIBRARY_ROWS
    assert f"showing the newest {LIBRARY_ROWS} of {LIBRARY_ROWS + 6} adapters" in page


def test_the_library_table_survives_a_corrupt_sample(tmp_path, tiny_net):
    pytest.importorskip("gradio")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from app import library_html

    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("torn", tiny_adapter(tmp_path / "a.safetensors", tiny_net), Image.new("RGB", (64, 64), (9, 90, 200)))
    sample = lib.root / "torn" / "sample.png"
    sample.write_bytes(sample.read_bytes()[:-40])
    (lib.root / "broken").mkdir()
    (lib.root / "broken" / WEIGHT_NAME).write_bytes(b"garbage")
    page = library_html(lib)
    assert 'data-adapter="torn"' in page and "no sample" in page and "skipped" in page and "broken" in page


# ---- training job state -----------------------------------------------------------------------------------------
def test_training_job_snapshots_and_cancel(images):
    job = TrainingJob(TrainRequest([str(p) for p in images], "p", "n", steps=3), owner="me", images=[])
    seen = []

    def consume():
        seen.extend(job.snapshots(interval=0.01))

    t = threading.Thread(target=consume)
    t.start()
    for step in (1, 2):
        job.on_step(step, 0.5 / step)
    job.cancel()
    assert job.should_stop()
    job.update(state="cancelled", message="cancelled at step 2/3")
    t.join(5)
    assert not t.is_alive() and seen[-1].state == "cancelled" and seen[-1].finished
    assert seen[-1].losses == [(1, 0.5), (2, 0.25)]


# ---- the shared pipeline: generation, mixing, import, export ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A saved tiny pipeline (seed 0) and adapter files trained on it (made by randomising z)."""
    from diffusers import DiffusionPipeline

    from loldu_sd import loldu_parameters
    from loldu_sd.diffusers import add_loldu_to_unet
    from loldu_sd.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_pipeline(root / "tiny-sd", seed=0)
    pipe = DiffusionPipeline.from_pretrained(base)
    files = {}
    for i, name in enumerate(["a", "b"]):
        add_loldu_to_unet(pipe.unet, LoLDUConfig(rank=4), name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in loldu_parameters(pipe.unet, name):
                if p.ndim:  # dz (it starts at 0); dsigma stays 0, within sigma_max
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        files[name] = pipe.save_loldu_weights(root / name, adapter_name=name)
    return base, files


@pytest.fixture
def studio(tiny_sd, tmp_path):
    from loldu_sd.studio import Studio

    s = Studio(tiny_sd[0], tmp_path / "library", device="cpu", sample_steps=1, scratch_dir=tmp_path / "scratch")
    for name, path in tiny_sd[1].items():
        s.library.add(name, path)
    return s


def pixels(images):
    return torch.stack([torch.from_numpy(__import__("numpy").asarray(im, dtype="float32")) for im in images])


def test_generate_mixes_and_switches_without_reloading(studio, monkeypatch):
    run = lambda *mix: pixels(studio.generate(GenerateRequest("a photo of sks toy", list(mix), steps=1)).images)  # noqa
    base, a, b = run(), run(("a", 1.0)), run(("b", 1.0))
    pipe = studio.pipeline()
    assert not torch.equal(base, a) and not torch.equal(a, b)
    assert studio.loaded_adapters() == ["a", "b"]
    assert torch.equal(run(("a", 1.0)), a) and torch.equal(run(), base)  # switching back is exact
    assert torch.equal(run(("a", 0.0)), base)  # weight 0 drops the adapter
    mix = run(("a", 1.0), ("b", 0.5))
    assert not torch.equal(mix, a) and not torch.equal(mix, b)
    assert pipe.get_loldu_adapters() == {studio._loaded["a"][1]: 1.0, studio._loaded["b"][1]: 0.5}
    assert studio.pipeline() is pipe  # one pipeline, never reloaded
    import loldu_sd.pipeline

    def no_load(*_args, **_kwargs):
        raise AssertionError("a cached adapter was read from disk again")

    monkeypatch.setattr(loldu_sd.pipeline, "load_loldu_weights", no_load)  # cached adapters: switching only
    gen = studio.generate(GenerateRequest("x", [("b", 1.0), ("a", 1.0)], steps=1))
    assert gen.switch_seconds >= 0 and gen.seconds >= 0 and studio.pipeline() is pipe
    assert base.shape[:3] == (1, studio.resolution, studio.resolution)


def test_compare_renders_every_concept_and_the_base_in_one_batch(studio):
    prompt, calls = "a photo of sks toy", []
    pipe = studio.pipeline()
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        out = studio.compare(CompareRequest(prompt, ["b", "a"], steps=2))
    finally:
        handle.remove()
    assert out.labels == ["b", "a", "base model"] and calls == [6, 6]  # 2 steps of one batch: 3 prompts x CFG
    alone = [studio.generate(GenerateRequest(prompt, mix, steps=2)).images[0]
             for mix in ([("b", 1.0)], [("a", 1.0)], [])]
    assert (pixels(out.images) - pixels(alone)).abs().max() <= 1  # uint8 images: within one level
    assert not torch.equal(pixels(out.images[:1]), pixels(out.images[2:]))
    with pytest.raises(StudioError, match="no adapter named 'gone'"):
        studio.compare(CompareRequest(prompt, ["a", "gone"]))


def test_cache_follows_the_library_on_disk(studio, tiny_sd):
    studio.generate(GenerateRequest("x", [("a", 1.0)], steps=1))
    internal = studio._loaded["a"][1]
    studio.rename_adapter("a", "renamed")
    studio.generate(GenerateRequest("x", [("renamed", 1.0)], steps=1))
    assert studio.loaded_adapters() == ["renamed"]  # the old name was evicted from the pipeline
    assert internal not in studio.pipeline().get_loldu_adapters()
    studio.delete_adapter("renamed")
    with pytest.raises(StudioError, match="no adapter named 'renamed'"):
        studio.generate(GenerateRequest("x", [("renamed", 1.0)], steps=1))
    studio.generate(GenerateRequest("x", steps=1))
    assert studio.loaded_adapters() == [] and not studio.pipeline().list_loldu_adapters()
    studio.library.exists = lambda name: True  # deleted by another session right after generate() checked
    studio.delete_adapter("b")
    with pytest.raises(StudioError, match="no adapter named 'b'") as e:
        studio.generate(GenerateRequest("x", [("b", 1.0)], steps=1))
    assert "\n" not in str(e.value) and not studio.pipeline().list_loldu_adapters()


def test_import_validates_against_the_base_model(studio, tiny_sd, tmp_path):
    from loldu_sd.diffusers import add_loldu_to_unet
    from loldu_sd.testing import tiny_pipeline

    info = studio.import_adapter(tiny_sd[1]["a"], "imported a")
    assert info.name == "imported_a" and info.sample is not None and info.rank == 4
    other = tiny_pipeline(seed=1)  # a different base model
    add_loldu_to_unet(other.unet, LoLDUConfig(rank=4), "x")
    foreign = save_loldu(tmp_path / "foreign.safetensors", {"unet": other.unet}, "x")
    lora = studio.export_lora("a")
    pipe = studio.pipeline()
    before = pipe.list_loldu_adapters()
    pickled = tmp_path / "adapter.bin"
    torch.save({"z": torch.zeros(3)}, pickled)
    disguised = tmp_path / "pickle.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    for path, msg in [(foreign, "different base model"), (lora, "is a LoRA file"), (pickled, "must be .safetensors"),
                      (disguised, "pickle"), (garbage, "rejected"), (plain, "not a LoLDU adapter")]:
        with pytest.raises(StudioError, match=msg) as err:
            studio.import_adapter(path, "bad")
        assert str(tmp_path) not in str(err.value)  # messages name the file, not server paths
    assert pipe.list_loldu_adapters() == before and not studio.library.exists("bad")
    with safe_open(str(tiny_sd[1]["a"]), "pt") as f:  # one layer listed twice: refused before any layer is wrapped
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    layers = json.loads(meta["layers"])
    layers["unet"][1] = layers["unet"][0]
    save_file(tensors, str(tmp_path / "twice.safetensors"), metadata={**meta, "layers": json.dumps(layers)})
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(StudioError, match="listed twice"):
        studio.import_adapter(tmp_path / "twice.safetensors", "twice")
    deep = "[" * 100_000 + "]" * 100_000  # was: a RecursionError traceback out of the server
    save_file(tensors, str(tmp_path / "deep.safetensors"), metadata={**meta, "layers": deep})
    with pytest.raises(StudioError, match=r"^deep.safetensors: rejected: corrupted LoLDU metadata \(JSON nested too"):
        studio.import_adapter(tmp_path / "deep.safetensors", "deep")
    assert pipe.list_loldu_adapters() == before and all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in
                                                        state.items())
    with pytest.raises(StudioError, match="already exists"):
        studio.import_adapter(tiny_sd[1]["a"], "a")


def test_export_lora_and_download(studio, tiny_sd):
    from safetensors import safe_open

    for fmt, key in [("diffusers", ".lora.down.weight"), ("kohya", ".lora_down.weight")]:
        path = studio.export_lora("b", fmt)
        assert path.name == "b.lora.safetensors" and path.is_relative_to(studio.scratch)
        with safe_open(str(path), "pt") as f:
            assert f.keys() and all(k.startswith(("unet.", "lora_unet_")) for k in f.keys())
            assert any(k.endswith(key) for k in f.keys()) and f.metadata()["loldu_adapter"] == "b"
    dl = studio.download_path("b")
    assert dl.name == "b.safetensors" and dl.read_bytes() == tiny_sd[1]["b"].read_bytes()
    with pytest.raises(StudioError, match="LoRA format"):
        studio.export_lora("b", "ckpt")


# ---- training jobs (the real trainer, 64 px, a few steps, no previews) -------------------------------------------
CONCEPT = sorted((Path(__file__).resolve().parents[1] / "assets" / "concept").glob("*.png"))


def wait(job, timeout=300):
    for snap in job.snapshots(interval=0.05):
        if snap.finished:
            return snap
    raise AssertionError("unreachable")


def request(name, steps=2, **kw):
    return TrainRequest([str(p) for p in CONCEPT[:3]], "a photo of sks robot", name, steps=steps, rank=4,
                        learning_rate=5e-3, seed=0, **kw)


def test_training_job_saves_into_the_library(studio):
    from loldu_sd.studio import StudioBusyError

    studio.trainer.preview_images = 0
    job = studio.trainer.start(request("été robot", class_prompt="a photo of a robot", num_class_images=1),
                               owner="s1")
    assert studio.trainer.busy()
    with pytest.raises(StudioBusyError, match="another training job is running"):
        studio.trainer.start(request("other"))
    assert studio.trainer.cancel(owner="s2") is None  # only the owner may cancel
    studio.trainer.note_waiting("s3")  # s3 waits in the queue (app.train_check records it), then cancels
    assert studio.trainer.cancel(owner="s3") == "queued" and not job.finished
    # its job, reaching the front, does not run
    assert studio.trainer.take_waiting("s3") and not studio.trainer.take_waiting("s3")
    studio.trainer.note_waiting("s4")
    assert not studio.trainer.take_waiting("s4")  # not cancelled: it runs
    snap = wait(job)
    assert snap.state == "done" and snap.step == 2 and [s for s, _ in snap.losses] == [1, 2], snap.message
    assert not studio.trainer.busy() and snap.adapter.name == "t_robot"
    assert snap.message.endswith("(the name 'été robot' became 't_robot': names keep only letters A-Z, digits, "
                                 "'-' and '_')")
    info = studio.library.info("t_robot")
    assert info.rank == 4 and info.sample is not None and info.instance_prompt == "a photo of sks robot"
    assert len(list((studio.library.root / ".class_images").glob("*/*.png"))) == 1  # cached for the next run
    assert not (studio.library.root / ".jobs" / job.id).exists()
    studio.generate(GenerateRequest("a photo of sks robot", [("t_robot", 1.0)], steps=1))  # loads in the shared pipe


def test_cancel_keeps_the_last_checkpoint(studio):
    studio.trainer.preview_images = 0
    job = studio.trainer.start(request("cancelled", steps=500, validation_every=1000), owner="me")
    for snap in job.snapshots(interval=0.05):
        if snap.step >= 1:
            assert studio.trainer.cancel(owner="me") == "running"
            break
    snap = wait(job)
    assert snap.state == "cancelled" and 1 <= snap.step < 500 and "kept the last checkpoint" in snap.message
    info = studio.library.info("cancelled")
    assert info.note.startswith("cancelled at step") and not studio.trainer.busy()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(studio, monkeypatch):
    from loldu_sd.training import loss

    real, calls = loss.diffusion_loss, []

    def poisoned(*args, **kwargs):  # steps 1-2 train normally, step 3 diverges
        calls.append(1)
        parts = real(*args, **kwargs)
        return parts if len(calls) <= 2 else [p * float("nan") for p in parts]

    monkeypatch.setattr(loss, "diffusion_loss", poisoned)  # patched where the trainer's batch_loss looks it up
    studio.trainer.preview_images = 0
    snap = wait(studio.trainer.start(request("diverged", steps=5, validation_every=2)))
    assert snap.state == "failed" and "the loss is nan" in snap.message and "lower the learning rate" in snap.message
    assert "kept the last good checkpoint" in snap.message and studio.library.exists("diverged")
    assert "Traceback" not in snap.message and str(studio.library.root) not in snap.message
    calls.clear()
    monkeypatch.setattr(loss, "diffusion_loss", lambda *a, **k: [p * float("nan") for p in real(*a, **k)])
    snap = wait(studio.trainer.start(request("nan-at-once", steps=3)))
    assert snap.state == "failed" and snap.message.endswith("nothing was saved")
    assert not studio.library.exists("nan-at-once") and not studio.trainer.busy()


def test_unexpected_trainer_error_is_one_line(studio, monkeypatch):
    from loldu_sd.studio import jobs  # Studio._run_job looks run_trainer up in jobs

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(jobs, "run_trainer", boom)
    snap = wait(studio.trainer.start(request("x")))
    assert snap.state == "failed" and snap.message == "training failed: RuntimeError: CUDA out of memory."
    assert not studio.trainer.busy() and not studio.library.exists("x")
