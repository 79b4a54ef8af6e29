"""End-to-end DreamBooth training on the tiny offline pipeline at 64 px with the robot in assets/concept.

Two real launches (accelerate launch, torchrun with 2 CPU processes); every other run is in-process through
train_dreambooth(parse_args([...])), which is what the studio calls. One torch thread everywhere: the runs are tiny,
and threads fighting over 2 shared cores cost 10x.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("diffusers")
import loldu_sd.diffusers  # noqa: E402,F401  (pipe.load_loldu_weights)
from loldu_sd import training  # noqa: E402
from loldu_sd.testing import save_tiny_pipeline, tiny_pipeline, update_errors  # noqa: E402
from loldu_sd.training import TrainingCallbacks, TrainingError, parse_args, train_dreambooth  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "assets" / "concept"
PROMPT = "a photo of sks robot"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}




@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-sd", seed=0)


def cli(tiny_sd, out, *extra):
    """Flags of a quick run: 64 px, no validation, no tensorboard, no checkpoints unless asked."""
    return ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(CONCEPT),
            "--instance_prompt", PROMPT, "--resolution", "64", "--output_dir", str(out), "--report_to", "none",
            "--num_validation_images", "0", "--checkpointing_steps", "1000", "--validation_inference_steps", "3",
            *extra]


def train(tiny_sd, out, *extra, callbacks=None):
    return train_dreambooth(parse_args(cli(tiny_sd, out, *extra)), callbacks)


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    return torch.from_numpy(out.images)


def test_accelerate_launch_end_to_end(tiny_sd, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(ROOT / "train_dreambooth_loldu.py"),
           *cli(tiny_sd, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
                "--num_validation_images", "2", "--report_to", "tensorboard", "--learning_rate", "5e-3")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"4/4 .*loss=\d\.\d+, lr=", proc.stderr)  # tqdm bar with loss and lr

    weights = out / "pytorch_loldu_weights.safetensors"
    t, meta = tensors(weights)
    assert set(t) == {"unet.loldu.dz", "unet.loldu.dsigma", "unet.loldu.pivots", "unet.loldu.fingerprint"}
    assert meta["format"] == "loldu" and meta["base_model"] == str(tiny_sd) and meta["instance_prompt"] == PROMPT
    assert json.loads(meta["config"])["rank"] == 32 and meta["training_steps"] == "4"
    size_kb = weights.stat().st_size / 1024
    assert size_kb < 20

    pipe = tiny_pipeline(seed=0)
    base = generate(pipe)
    pipe.load_loldu_weights(out)
    assert not torch.allclose(generate(pipe), base, atol=1e-3)

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(tiny_sd) and front["instance_prompt"] == PROMPT
    assert {"loldu", "text-to-image", "diffusers", "stable-diffusion"} <= set(front["tags"])
    assert [w["output"]["url"] for w in front["widget"]] == ["image_0.png", "image_1.png"]
    assert f"{size_kb:.1f} KB" in card and "| rank / alpha | 32 / 32 |" in card and "validation_grid.png" in card
    for png in ("validation_grid.png", "loss_curve.png", "image_0.png", "image_1.png"):
        with Image.open(out / png) as im:
            assert im.width >= 64, png
    with Image.open(out / "validation_grid.png") as im:
        assert im.size == (128, 64)
    for step in (2, 4):  # adapter + optimizer + scheduler + RNG + step; never the frozen UNet
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert files == {"pytorch_loldu_weights.safetensors", "optimizer.safetensors", "optimizer.json",
                         "scheduler.json", "random_states_0.safetensors", "random_states_0.json",
                         "training_state.json"}  # no pickle anywhere
        assert not any(f.startswith("model") for f in files)
        assert json.loads((out / f"checkpoint-{step}" / "training_state.json").read_text())["global_step"] == step
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_prior_preservation_generates_class_images(tiny_sd, tmp_path):
    class_dir = tmp_path / "class"
    (class_dir).mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(class_dir / "mine.png")  # one already there: 2 more are generated
    result = train(tiny_sd, tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(class_dir),
                   "--class_prompt", "a photo of a robot", "--num_class_images", "3", "--sample_batch_size", "2",
                   "--max_train_steps", "2")
    generated = sorted(p.name for p in class_dir.iterdir() if p.name != "mine.png")
    assert len(generated) == 2 and all(re.fullmatch(r"0000[12]-[0-9a-f]{12}\.png", n) for n in generated)
    with Image.open(class_dir / generated[0]) as im:
        assert im.size == (64, 64)
    assert result.steps == 2 and result.adapter_path.is_file()
    assert "prior preservation | 'a photo of a robot', 3 images" in (tmp_path / "out" / "README.md").read_text()


def test_text_encoder_with_gradient_checkpointing_is_trained_saved_and_validated(tiny_sd, tmp_path):
    previews = []
    result = train(tiny_sd, tmp_path / "out", "--train_text_encoder", "--gradient_checkpointing", "--max_train_steps",
                   "2", "--learning_rate", "5e-3", "--num_validation_images", "1", "--validation_steps", "1",
                   callbacks=TrainingCallbacks(on_validation=lambda step, images: previews.append((step, images))))
    assert [(step, len(images), images[0].size) for step, images in previews] == [(1, 1, (64, 64)), (2, 1, (64, 64))]
    t, meta = tensors(result.adapter_path)
    assert {"text_encoder.loldu.dz", "text_encoder.loldu.dsigma"} <= set(t)
    assert {n.rsplit(".", 1)[-1] for n, _ in json.loads(meta["layers"])["text_encoder"]} == \
        {"q_proj", "k_proj", "v_proj", "out_proj"}
    pipe = tiny_pipeline(seed=0)
    pipe.load_loldu_weights(result.adapter_path)
    deltas = [layer.delta_weight().abs().max() for _, layer in loldu_sd.loldu_layers(pipe.text_encoder)]
    assert len(deltas) == 8 and min(deltas) > 0  # every adapted text-encoder layer moved
    assert min(layer.delta_weight().abs().max() for _, layer in loldu_sd.loldu_layers(pipe.unet)) > 0


def test_resume_after_2_steps_equals_4_straight_steps(tiny_sd, tmp_path):
    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip", "--train_batch_size", "2",
             "--learning_rate", "5e-3", "--lr_warmup_steps", "3", "--train_text_encoder")  # text_model.* names too
    steps = []
    first = train(tiny_sd, tmp_path / "a", *extra, callbacks=TrainingCallbacks(
        on_step=lambda s, loss: steps.append(s), should_stop=lambda: len(steps) >= 2))
    assert first.cancelled and first.steps == 2 and first.checkpoint.name == "checkpoint-2"
    (tmp_path / "a" / "checkpoint-3.tmp-dead").mkdir()  # a save killed midway: 'latest' must not pick it
    resumed = train(tiny_sd, tmp_path / "a", *extra, "--resume_from_checkpoint", "latest")
    straight = train(tiny_sd, tmp_path / "b", *extra)
    assert resumed.steps == straight.steps == 4 and not (tmp_path / "a" / "checkpoint-3.tmp-dead").exists()
    a, _ = tensors(resumed.adapter_path)
    b, _ = tensors(straight.adapter_path)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.losses == straight.losses  # steps 1-2 restored from the checkpoint, 3-4 recomputed
    at2, _ = tensors(tmp_path / "a" / "checkpoint-2" / "pytorch_loldu_weights.safetensors")
    assert not torch.equal(at2["unet.loldu.dz"], b["unet.loldu.dz"])


def test_torchrun_2_processes_and_accumulation_match_1_process_with_the_same_global_batch(tiny_sd, tmp_path):
    extra = ("--max_train_steps", "3", "--learning_rate", "5e-3", "--lr_warmup_steps", "0", "--random_flip")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_dreambooth_loldu.py"), *cli(tiny_sd, tmp_path / "ddp", "--train_batch_size", "1", *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = re.search(r"adapter digest per process: (\w+) (\w+)\n", proc.stderr)
    ddp, _ = tensors(tmp_path / "ddp" / "pytorch_loldu_weights.safetensors")
    assert digests and digests.group(1) == digests.group(2) == training.adapter_digest(ddp)

    single = train(tiny_sd, tmp_path / "one", "--train_batch_size", "2", *extra)
    accumulated = train(tiny_sd, tmp_path / "acc", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                        *extra)
    one, _ = tensors(single.adapter_path)
    acc, _ = tensors(accumulated.adapter_path)
    for k in ("unet.loldu.dz", "unet.loldu.dsigma"):
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(acc[k], one[k], rtol=0, atol=1e-6)


def test_adapter_learns_the_concept(tiny_sd, tmp_path):
    """Denoising loss on the concept images, on fixed noise and timesteps, drops below the base model's."""
    result = train(tiny_sd, tmp_path / "out", "--max_train_steps", "30", "--learning_rate", "5e-3", "--center_crop")
    images = [Image.open(p) for p in sorted(CONCEPT.glob("*.png"))]
    pipe = tiny_pipeline(seed=0)
    base = training.evaluate_denoising_loss(pipe, images, PROMPT, 64, seed=0, draws=4)
    pipe.load_loldu_weights(result.adapter_path)
    learnt = training.evaluate_denoising_loss(pipe, images, PROMPT, 64, seed=0, draws=4)
    assert learnt < 0.95 * base, (base, learnt)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_sd, tmp_path, monkeypatch):
    calls, real = [], training.loss.denoising_loss

    def loss_nan_at_step_3(pred, target, weights=None):
        calls.append(1)
        return real(pred, target, weights) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(training.loss, "denoising_loss", loss_nan_at_step_3)
    out = tmp_path / "out"
    message = r"^step 3: the loss is nan; .*Last good checkpoint: .*checkpoint-2\. "
    with pytest.raises(TrainingError, match=message) as e:
        train(tiny_sd, out, "--max_train_steps", "5", "--checkpointing_steps", "2")
    assert "\n" not in str(e.value)
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "pytorch_loldu_weights.safetensors").exists()
    t, _ = tensors(out / "checkpoint-2" / "pytorch_loldu_weights.safetensors")
    assert torch.isfinite(t["unet.loldu.dz"]).all()
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2


def test_a_diverging_run_stops_at_once_and_names_only_checkpoints_that_load(tiny_sd, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"^step 2: after the optimizer step, layer unet\..* x \|\|W0\|\|") as e:
        train(tiny_sd, out, "--learning_rate", "1e6", "--lr_warmup_steps", "3", "--max_train_steps", "5",
              "--checkpointing_steps", "1")
    named = str(e.value).split("Last good checkpoint: ")[1].split(". Lower")[0]
    saved = training.list_checkpoints(out)  # step 1 has lr 0 (warmup): it is saved, step 2 diverges
    assert [c.name for c in saved] == ["checkpoint-1"] and named == str(saved[-1])
    assert not (out / "pytorch_loldu_weights.safetensors").exists()
    pipe = tiny_pipeline(seed=0)
    for checkpoint in saved:
        pipe.load_loldu_weights(checkpoint, adapter_name=checkpoint.name.replace("-", "_"))


def test_a_pickle_in_a_checkpoint_is_refused_unread_and_a_damaged_one_is_one_line(tiny_sd, tmp_path, monkeypatch):
    import pickle

    out = tmp_path / "out"
    train(tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    (out / "checkpoint-1" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"lr": 1.0}))

    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle a checkpoint file")

    for obj, name in ((pickle, "Unpickler"), (pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(obj, name, forbidden)
    with pytest.raises(training.TrainingInputError, match=r"holds custom_checkpoint_0\.pkl, a pickle file") as e:
        train(tiny_sd, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    (out / "checkpoint-1" / "custom_checkpoint_0.pkl").unlink()
    good = (out / "checkpoint-1" / "optimizer.safetensors").read_bytes()
    (out / "checkpoint-1" / "optimizer.safetensors").write_bytes(good[:-8])  # truncated
    with pytest.raises(training.TrainingInputError, match=r"checkpoint-1: optimizer.safetensors: unreadable \(.*\); "
                                                             r"this checkpoint is damaged or was edited: resume from"):
        train(tiny_sd, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    (out / "checkpoint-1" / "optimizer.safetensors").write_bytes(good)
    adapter = out / "checkpoint-1" / "pytorch_loldu_weights.safetensors"
    t, meta = tensors(adapter)
    t["unet.loldu.dz"][0] = float("nan")  # as written before parameters were checked
    save_file(t, str(adapter), metadata=meta)
    with pytest.raises(training.TrainingInputError, match=r"checkpoint-1: pytorch_loldu_weights\.safetensors: "
                                                             r"unet\.loldu\.dz holds NaN/inf values; .*resume from an"):
        train(tiny_sd, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")


def _edit_tensors(name, key, change):
    def edit(folder):
        t, meta = tensors(folder / name)
        t[key] = change(t[key])
        save_file(t, str(folder / name), metadata=meta)
    return edit


def _edit_json(name, change):
    def edit(folder):
        value = json.loads((folder / name).read_text())
        change(value)
        (folder / name).write_text(json.dumps(value))
    return edit


ADAPTER = "pytorch_loldu_weights.safetensors"
CRAFTED = {  # how a checkpoint was damaged or crafted -> the file and problem the one line names
    "sigma_cut_to_3": (_edit_tensors(ADAPTER, "unet.loldu.dsigma", lambda t: t[:3].clone()),
                       r"pytorch_loldu_weights.safetensors: unet.loldu.dsigma is missing or not a torch.float32 "),
    "fingerprint_x3": (_edit_tensors(ADAPTER, "unet.loldu.fingerprint", lambda t: t * 3),
                       r"pytorch_loldu_weights.safetensors: unet.loldu.fingerprint differs from this base model's"),
    "pivots_reversed": (_edit_tensors(ADAPTER, "unet.loldu.pivots", lambda t: t.flip(0).clone()),
                        r"pytorch_loldu_weights.safetensors: unet.loldu.pivots differs from this base model's"),
    "float_pivots": (_edit_tensors(ADAPTER, "unet.loldu.pivots", lambda t: t.float()),
                     r"unreadable adapter \(.*weights.safetensors: corrupted: unet.loldu.pivots is float32"),
    "global_step_1e9": (_edit_json("training_state.json", lambda v: v.update(global_step=10**9)),
                        r"training_state.json: global_step 1000000000 does not match the folder's name"),
    "global_step_text": (_edit_json("training_state.json", lambda v: v.update(global_step="1")),
                         r"training_state.json: global_step '1' .* not whole numbers"),
    "losses_null": (_edit_json("training_state.json", lambda v: v.update(losses=None)),
                    r"training_state.json: losses are not 1 \[step, finite loss\] pairs"),
    "nan_lr": (_edit_json("optimizer.json", lambda v: v["param_groups"][0].update(lr=float("nan"))),
               r"optimizer.json: param_groups\[0\].lr is nan, not a finite float"),
    "betas_text": (_edit_json("optimizer.json", lambda v: v["param_groups"][0].update(betas="0.9")),
                   r"optimizer.json: param_groups\[0\].betas is not a list of 2"),
    "moment_shape": (_edit_tensors("optimizer.safetensors", "0.exp_avg", lambda t: t[:1].clone()),
                     r"optimizer.safetensors: 0.exp_avg has shape \(1,\)"),
    "moment_nan": (_edit_tensors("optimizer.safetensors", "1.exp_avg_sq", lambda t: t * float("nan")),
                   r"optimizer.safetensors: 1.exp_avg_sq holds NaN/inf"),
    "scheduler_epoch": (_edit_json("scheduler.json", lambda v: v["scheduler"].update(last_epoch=7)),
                        r"scheduler.json: scheduler.last_epoch 7 is not global_step 1"),
    "scheduler_type": (_edit_json("scheduler.json", lambda v: v["scheduler"].update(base_lrs="x")),
                       r"scheduler.json: scheduler.base_lrs is not a list"),
    "rng_python_cut": (_edit_json("random_states_0.json", lambda v: v["python"][1].pop()),
                       r"random_states_0.json/.safetensors: not an RNG state"),
    "rng_torch_dtype": (_edit_tensors("random_states_0.safetensors", "torch", lambda t: t.float()),
                        r"random_states_0.json/.safetensors: not an RNG state \(torch is not a byte vector\)"),
}


@pytest.fixture(scope="module")
def one_checkpoint(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("crafted") / "out"
    train(tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--num_validation_images", "0")
    return out


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_or_damaged_checkpoint_is_refused_before_anything_is_restored(tiny_sd, one_checkpoint, tmp_path,
                                                                             case):
    out = tmp_path / "out"
    shutil.copytree(one_checkpoint / "checkpoint-1", out / "checkpoint-1")
    edit, match = CRAFTED[case]
    edit(out / "checkpoint-1")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(training.TrainingInputError, match=r"^--resume_from_checkpoint .*checkpoint-1: " + match) as e:
        train(tiny_sd, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert "\n" not in str(e.value) and "resume from an earlier one" in str(e.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written, nothing saved


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_stays_bit_exact(tiny_sd, tmp_path, monkeypatch):
    import errno

    calls, real = [], training.checkpoints.write_optimizer_state

    def disk_full_on_second_save(folder, *args):
        calls.append(folder)
        real(folder, *args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training.checkpoints, "write_optimizer_state", disk_full_on_second_save)
    out, extra = tmp_path / "out", ("--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "5e-3")
    with pytest.raises(TrainingError, match=r"could not write .*checkpoint-4 \(No space left on device\); the last "
                                            r"checkpoint, .*checkpoint-2, is untouched") as e:
        train(tiny_sd, out, *extra)
    assert "\n" not in str(e.value) and not list(out.glob("*.tmp-*"))
    monkeypatch.undo()
    resumed = train(tiny_sd, out, *extra, "--resume_from_checkpoint", "latest")
    straight = train(tiny_sd, tmp_path / "straight", *extra)
    a, _ = tensors(resumed.adapter_path)
    b, _ = tensors(straight.adapter_path)
    assert all(torch.equal(a[k], b[k]) for k in b) and resumed.losses == straight.losses


def test_unknown_target_modules_or_an_unloadable_base_model_are_one_line(tiny_sd, tmp_path):
    with pytest.raises(training.TrainingInputError, match=r"^--target_modules foo: 'foo': no such Linear layer"):
        train(tiny_sd, tmp_path / "out", "--target_modules", "foo")
    with pytest.raises(training.TrainingInputError, match=r"^--target_modules to_q,to_kk: 'to_kk': no such Linear"):
        train(tiny_sd, tmp_path / "out", "--target_modules", "to_q,to_kk")  # was: to_q alone, both recorded
    with pytest.raises(training.TrainingInputError, match=r"^--rank 100000 is larger than the UNet's .* allows "
                                                          r"\(\d+x\d+: at most \d+\); use --rank \d+ or less$"):
        train(tiny_sd, tmp_path / "out", "--rank", "100000")  # was: clamped per layer, metadata said 100000
    (tmp_path / "not-a-model").mkdir()  # refused before loading: no pipeline config
    with pytest.raises(training.TrainingInputError, match=r"^--pretrained_model_name_or_path .*not-a-model: cannot "
                                                          r"read its pipeline config \([^\n]*\)$"):
        train_dreambooth(parse_args(cli(tmp_path / "not-a-model", tmp_path / "out")))
    no_weights = tmp_path / "no-weights"  # its configs read, its weights are missing
    no_weights.mkdir()
    shutil.copy(tiny_sd / "model_index.json", no_weights)
    shutil.copytree(tiny_sd / "scheduler", no_weights / "scheduler")
    with pytest.raises(training.TrainingInputError, match=r"^--pretrained_model_name_or_path .*no-weights: could "
                                                          r"not load the base model \((OSError|ValueError): [^\n]*$"):
        train_dreambooth(parse_args(cli(no_weights, tmp_path / "out")))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_two_runs_never_write_one_output_folder_and_a_dead_runs_lock_is_taken_over(tiny_sd, tmp_path):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    lock = out / training.checkpoints.LOCK_NAME
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # a live run: this very process
    with pytest.raises(training.TrainingInputError, match=r"^--output_dir .*out: another training run \(host and "):
        train(tiny_sd, out, "--max_train_steps", "1")
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}" and not list(out.glob("*.safetensors"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")  # its run was killed: the lock is stale
    assert train(tiny_sd, out, "--max_train_steps", "1").steps == 1 and not lock.exists()


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tiny_sd, tmp_path, monkeypatch):
    calls, real = [], training.checkpoints._fsync_tree

    def killed_during_second_save(folder):
        calls.append(folder)
        if len(calls) == 2:  # checkpoint-4's files are written but not yet renamed into place
            raise KeyboardInterrupt
        real(folder)

    monkeypatch.setattr(training.checkpoints, "_fsync_tree", killed_during_second_save)
    out, extra = tmp_path / "out", ("--max_train_steps", "6", "--checkpointing_steps", "2")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_sd, out, *extra)
    assert [p.name for p in out.glob("checkpoint-4*")] == [calls[1].name] and ".tmp-" in calls[1].name
    assert training.resolve_checkpoint(out, "latest").name == "checkpoint-2"
    monkeypatch.undo()
    result = train(tiny_sd, out, *extra, "--resume_from_checkpoint", "latest")
    saved = json.loads((out / "checkpoint-2" / "training_state.json").read_text())["losses"]
    assert result.steps == 6 and [list(x) for x in result.losses[:2]] == saved
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not list(out.glob("*.tmp-*"))


def test_cancel_before_the_first_step_saves_nothing(tiny_sd, tmp_path):
    result = train(tiny_sd, tmp_path / "x", callbacks=TrainingCallbacks(should_stop=lambda: True))
    assert result.cancelled and result.steps == 0 and result.adapter_path is None
    assert not (tmp_path / "x" / "pytorch_loldu_weights.safetensors").exists()


def test_training_leaves_the_callers_rngs_and_tf32_alone_and_keeps_one_precision(tiny_sd, tmp_path):
    """No process-wide side effect: the caller's RNG sequences and TF32 switch are as before; accelerate's state is
    not reset behind the caller's back, so another precision in the same process is refused in one line."""
    import random

    import numpy as np

    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    train(tiny_sd, tmp_path / "run", "--max_train_steps", "1", "--allow_tf32", "--seed", "7")
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    with pytest.raises(training.TrainingInputError, match="--mixed_precision bf16: this process already trained "):
        train(tiny_sd, tmp_path / "bf16", "--mixed_precision", "bf16", "--max_train_steps", "1")


def test_bf16_on_cpu_trains(tiny_sd, tmp_path):
    seen = []
    result = train(tiny_sd, tmp_path / "bf16", "--mixed_precision", "bf16", "--max_train_steps", "2",
                   callbacks=TrainingCallbacks(on_step=lambda s, loss: seen.append((s, loss))))
    assert [s for s, _ in seen] == [1, 2] and all(loss == loss for _, loss in seen)
    t, _ = tensors(result.adapter_path)
    assert t["unet.loldu.dz"].dtype == torch.float32


def test_bf16_trained_adapter_loads_on_fp32_and_fp16_pipelines(tiny_sd, tmp_path):
    result = train(tiny_sd, tmp_path / "bf16", "--mixed_precision", "bf16", "--max_train_steps", "2",
                   "--train_text_encoder", "--learning_rate", "5e-2")
    made = tiny_pipeline(seed=0).to(dtype=torch.bfloat16)  # the precision the factors were made in
    made.load_loldu_weights(result.adapter_path)
    for dtype in (torch.float32, torch.float16):
        pipe = tiny_pipeline(seed=0).to(dtype=dtype)
        pipe.load_loldu_weights(result.adapter_path)
        for comp in ("unet", "text_encoder"):
            errors = update_errors(getattr(made, comp), getattr(pipe, comp))
            assert len(errors) > 0 and max(errors.values()) <= 16 * 2.0**-8, (dtype, comp, max(errors.values()))


def test_loss_options_train_and_change_the_losses(tiny_sd, tmp_path):
    common = ("--max_train_steps", "2", "--train_text_encoder")
    plain = train(tiny_sd, tmp_path / "plain", *common)
    tuned = train(tiny_sd, tmp_path / "tuned", *common, "--snr_gamma", "5", "--noise_offset", "0.05",
                  "--text_encoder_use_attention_mask")
    assert tuned.steps == 2 and tuned.adapter_path.exists()
    assert all(loss == loss for _, loss in tuned.losses) and tuned.losses != plain.losses


def test_sdxl_trains_both_text_encoders_saves_and_loads_into_a_fresh_pipeline(tmp_path):
    from loldu_sd.testing import tiny_sdxl_pipeline

    base_dir = save_tiny_pipeline(tmp_path / "tiny-sdxl", seed=0, sdxl=True)
    result = train(base_dir, tmp_path / "out", "--max_train_steps", "2", "--train_text_encoder",
                   "--learning_rate", "5e-2", "--num_validation_images", "1", "--validation_steps", "1")
    t, _ = tensors(result.adapter_path)
    assert {k.split(".")[0] for k in t} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(loss == loss for _, loss in result.losses) and len(result.images) == 1
    pipe = tiny_sdxl_pipeline(seed=0)
    base = generate(pipe)
    assert pipe.load_loldu_weights(result.adapter_path) == "default"
    assert not torch.allclose(generate(pipe), base, atol=1e-4)
