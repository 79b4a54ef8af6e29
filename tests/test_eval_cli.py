"""`python -m eval score` and `python -m eval dreambooth`: outputs, seeds, aggregation and bad input (offline)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from eval.__main__ import main
from eval.dreambooth import Subject, evaluate
from eval.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]


def save_noise(folder: Path, names, seed=0, size=48):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def run_python(args, tmp_path, **env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf_home"), **env}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


# ---- score --------------------------------------------------------------------------------------------------------
def test_score_cli_writes_table_json_csv(tmp_path):
    gen = save_noise(tmp_path / "gen", ["000_00.png", "001_00.png", "002_00.jpg"], seed=1)
    (gen / "broken.png").write_bytes(b"not a png")  # skipped with a warning naming it
    save_noise(tmp_path / "ref", ["a.png", "b.png"], seed=2)
    (tmp_path / "prompts.txt").write_text("a sks dog in the snow\na red sks dog\n\na sks dog on the beach\n")
    r = run_python(["-m", "eval", "score", "--generated", "gen", "--reference", "ref", "--prompts", "prompts.txt",
                    "--backbones", "random-tiny", "--device", "cpu", "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| DINO | CLIP-I | CLIP-T |" in r.stdout and "mean nothing" in r.stdout
    assert "broken.png: skipped, not a readable image" in r.stderr
    res = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert (res["n_generated"], res["n_reference"], res["variant"], res["identifier"]) == (3, 2, "cosine", "drop")
    assert all(-1 <= res[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    assert [(x["image"], x["clip_t_text"]) for x in rows] == [
        ("000_00.png", "a dog in the snow"), ("001_00.png", "a red dog"), ("002_00.jpg", "a dog on the beach")]
    summary = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(summary) == 1 and float(summary[0]["dino"]) == pytest.approx(res["dino"])


def test_score_cli_bad_input(tmp_path, capsys):
    gen = save_noise(tmp_path / "gen", ["1.png", "2.png", "3.png"])
    ref = save_noise(tmp_path / "ref", ["r.png"])
    (tmp_path / "p.txt").write_text("a sks dog\na red sks dog\n")
    common = ["--backbones", "random-tiny", "--out", str(tmp_path / "out")]
    assert main(["score", "--generated", str(gen), "--reference", str(ref), "--prompts", str(tmp_path / "p.txt"),
                 *common]) == 2
    assert "has 2 prompts but" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["score", "--generated", str(tmp_path / "empty"), "--reference", str(ref), "--prompt", "x",
                 *common]) == 2
    assert "empty: is empty" in capsys.readouterr().err
    assert main(["score", "--generated", str(tmp_path / "nope"), "--reference", str(ref), "--prompt", "x",
                 *common]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    assert main(["score", "--generated", str(gen), "--reference", str(ref), "--prompts", str(tmp_path / "no.txt"),
                 *common]) == 2
    assert "prompts file" in capsys.readouterr().err


def test_an_empty_prompt_or_an_out_that_is_a_file_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    import eval.scorer

    gen = save_noise(tmp_path / "gen", ["1.png"])
    (tmp_path / "taken").write_text("not a folder")
    monkeypatch.setattr(eval.scorer, "scorer_from_args", lambda args: pytest.fail("scored before refusing"))
    for flags, words in ((["--prompt", "  ", "--out", str(tmp_path / "out")], "error: --prompt is empty"),
                         (["--prompt", "x", "--out", str(tmp_path / "taken")], "taken: is a file, not a folder"),
                         (["--prompt", "x", "--out", str(tmp_path / "taken" / "sub")], "cannot be created")):
        assert main(["score", "--generated", str(gen), "--reference", str(gen), *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert (tmp_path / "taken").read_text() == "not a folder" and not (tmp_path / "out").exists()


def test_backbones_unavailable_offline_name_model_and_fix(tmp_path):
    """No Hub access and an empty cache: each default backbone fails with its name and how to give local weights."""
    save_noise(tmp_path / "gen", ["1.png"])
    code = ("from eval.__main__ import main\n"
            "base = ['score', '--generated', 'gen', '--reference', 'gen', '--prompt', 'a sks dog', '--device', 'cpu']\n"
            "print('rc', main(base), main(base + ['--dino_model', 'random-tiny']))\n")
    r = run_python(["-c", code], tmp_path, HF_HUB_OFFLINE="1")
    assert "rc 2 2" in r.stdout, r.stderr
    dino, clip = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "'dino_vits16'" in dino and "--dino_weights PATH" in dino and "HF_HOME" in dino
    assert "'ViT-B-32'" in clip and "openai" in clip and "--clip_weights PATH" in clip


# ---- dreambooth ---------------------------------------------------------------------------------------------------
class FakePipe:
    """Records calls; each image is noise seeded by its generator (and shifted when an adapter is active)."""

    def __init__(self):
        self.calls, self.adapter = [], None

    def __call__(self, prompt, num_images_per_prompt, generator, **kw):
        seeds = [g.initial_seed() for g in generator]
        assert len(seeds) == num_images_per_prompt
        self.calls.append((prompt, seeds, self.adapter, kw))
        shift = 0 if self.adapter is None else 1000
        return SimpleNamespace(images=[Image.fromarray(np.random.default_rng(s + shift).integers(
            0, 256, (32, 32, 3), dtype=np.uint8)) for s in seeds])

    def load_loldu_weights(self, path, adapter_name=None):
        assert self.adapter is None and Path(path).name == "adapter.safetensors"
        self.adapter = adapter_name
        return adapter_name

    def delete_loldu_adapters(self, names):
        assert names == self.adapter
        self.adapter = None


def pixel_embed(images):
    return np.stack([np.asarray(im.resize((4, 4)), dtype=np.float64).ravel() - 127.5 for im in images])


def test_dreambooth_evaluate_seeds_outputs_and_table(tmp_path, monkeypatch):
    import eval.dreambooth

    # evaluate() calls the library's pipeline functions: here they drive the fake pipeline's recorder
    monkeypatch.setattr(eval.dreambooth, "load_loldu_weights", lambda p, path, adapter_name=None:
                        p.load_loldu_weights(path, adapter_name))
    monkeypatch.setattr(eval.dreambooth, "delete_loldu_adapters", lambda p, names: p.delete_loldu_adapters(names))
    subjects = [Subject(name, str(tmp_path / "adapter.safetensors"),
                        str(save_noise(tmp_path / "ref" / name, ["0.jpg", "1.jpg", "2.jpg"], seed=i)), cls)
                for i, (name, cls) in enumerate([("dog", "dog"), ("dog2", "dog"), ("backpack", "backpack")])]
    scorer = Scorer(dino_embed_fn=pixel_embed, clip_image_embed_fn=pixel_embed,
                    clip_text_embed_fn=lambda t: np.stack([[len(x), x.count("a"), 1.0] * 16 for x in t]))
    pipe = FakePipe()
    res = evaluate(pipe, scorer, subjects, tmp_path / "out", images_per_prompt=2, prompts_limit=2, seed=10,
                   with_base=True, num_inference_steps=3)
    # seeds: image k of a subject uses seed + k, for base and adapter alike; base images shared by the two dogs
    assert [(c[1], c[2]) for c in pipe.calls] == [
        ([10, 11], None), ([12, 13], None), ([10, 11], "dog"), ([12, 13], "dog"), ([10, 11], "dog2"),
        ([12, 13], "dog2"), ([10, 11], None), ([12, 13], None), ([10, 11], "backpack"), ([12, 13], "backpack")]
    assert pipe.calls[0][0] == "a sks dog in the jungle" and pipe.calls[-1][0] == "a sks backpack in the snow"
    assert all(c[3] == {"num_inference_steps": 3} for c in pipe.calls)
    out = tmp_path / "out"
    assert [p.name for p in sorted((out / "dog" / "images").iterdir())] == [
        "000_00.png", "000_01.png", "001_00.png", "001_01.png", "prompts.txt"]
    assert (out / "dog" / "images" / "prompts.txt").read_text().splitlines()[2] == "a sks dog in the snow"
    assert Image.open(out / "dog" / "grid.png").size == (3 * 128, 3 * (128 + 14))  # refs on top + 2 prompt rows
    assert Image.open(out / "scores.png").size[0] > 0 and (out / "table.md").read_text().count("|") > 20
    table = {row["method"]: row for row in res["table"]}
    assert list(table) == ["Real images", "Base model (no adapter)", "LoLDU adapter"]
    assert table["Real images"]["clip_t"] is None and table["LoLDU adapter"]["n_subjects"] == 3
    per = [s["loldu"]["dino"] for s in res["subjects"]]
    assert table["LoLDU adapter"]["dino"] == pytest.approx(sum(per) / 3)  # mean over subjects
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 * 3 + 3 and rows[-1]["subject"] == "mean"
    saved = json.loads((out / "results.json").read_text())
    assert saved["published"][1]["dino"] == 0.668 and saved["subjects"][0]["loldu"]["n_generated"] == 4


def test_dreambooth_cli_bad_subject_groups(tmp_path, capsys):
    base = ["dreambooth", "--pretrained_model_name_or_path", "x", "--out", str(tmp_path)]
    assert main(base + ["--subject", "dog", "--subject", "cat", "--adapter", "a", "--reference", "r"]) == 2
    assert "got 2 --subject, 1 --adapter and 1 --reference" in capsys.readouterr().err
    assert main(base + ["--subject", "unicorn", "--adapter", "a", "--reference", "r"]) == 2
    assert "not a DreamBooth dataset subject; pass its class token" in capsys.readouterr().err
    assert main(base + ["--subject", "dog", "--adapter", str(tmp_path / "no.safetensors"), "--reference", "r"]) == 2
    assert "no such adapter file" in capsys.readouterr().err


@pytest.mark.slow
def test_dreambooth_end_to_end_on_tiny_pipeline(tmp_path):
    """2 prompts x 1 image on the tiny SD pipeline with a real LoLDU adapter: JSON, CSV, grid and chart."""
    testing = pytest.importorskip("loldu_sd.testing")
    import loldu_sd.diffusers

    pipe = testing.tiny_pipeline(seed=0)
    loldu_sd.diffusers.add_loldu_to_unet(pipe.unet, loldu_sd.LoLDUConfig(rank=2), "dog")
    pipe.save_loldu_weights(tmp_path / "adapter")
    testing.save_tiny_pipeline(tmp_path / "sd", seed=0)
    ref = save_noise(tmp_path / "ref", ["0.png", "1.png"], size=64)
    out = tmp_path / "out"
    assert main(["dreambooth", "--pretrained_model_name_or_path", str(tmp_path / "sd"), "--subject", "dog",
                 "--adapter", str(tmp_path / "adapter"), "--reference", str(ref), "--class_token", "dog",
                 "--unique_token", "sks", "--images_per_prompt", "1", "--prompts_limit", "2",
                 "--num_inference_steps", "2", "--seed", "3", "--with_base", "--backbones", "random-tiny",
                 "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["table"]] == ["Real images", "Base model (no adapter)", "LoLDU adapter"]
    assert res["subjects"][0]["loldu"]["n_generated"] == 2 and "mean nothing" in res["backbones"]["note"]
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 3 + 3
    assert Image.open(out / "dog" / "grid.png").size == (2 * 128, 3 * (128 + 14))
    assert Image.open(out / "dog" / "images" / "001_00.png").size == (64, 64)
    assert (out / "scores.png").stat().st_size > 1000


def test_manifest_csv_and_json(tmp_path):
    from eval.dreambooth import read_manifest

    (tmp_path / "adapters" / "dog").mkdir(parents=True)
    (tmp_path / "m.csv").write_text("subject,adapter,reference,class_token\n"
                                    "dog,adapters/dog,data/dog,\nmy_toy,user/repo,data/toy,stuffed animal\n")
    dog, toy = read_manifest(tmp_path / "m.csv", unique_token="zwx")
    assert dog == Subject("dog", str(tmp_path / "adapters" / "dog"), str(tmp_path / "data" / "dog"), "dog", "zwx")
    assert (toy.adapter, toy.class_token) == ("user/repo", "stuffed animal")  # not a local path: a Hub repo id
    (tmp_path / "m.json").write_text(json.dumps([{"subject": "cat2", "adapter": "a", "reference": "r",
                                                  "unique_token": "sks"}]))
    assert read_manifest(tmp_path / "m.json")[0].class_token == "cat"
    (tmp_path / "bad.json").write_text(json.dumps([{"subject": "cat2", "adapter": "a"}]))
    with pytest.raises(ValueError, match="entry 0: missing reference"):
        read_manifest(tmp_path / "bad.json")
