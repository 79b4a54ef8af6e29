"""eval.glue / eval.vit recipes end to end on tiny synthetic data (offline), metrics, and the LLaMA injection bench."""
import sys

import pytest
import torch

pytest.importorskip("transformers")

from eval import glue, vit  # noqa: E402
from eval.bench import llama as bench_llama  # noqa: E402
from loldu_sd.transformers import load_transformer_adapter  # noqa: E402


def test_table_defaults_match_the_paper():
    assert glue.TABLE_VII["sst2"] == (4e-4, 10, 128) and glue.TABLE_VII["stsb"] == (2e-4, 30, 512)
    assert glue.PAPER == dict(model="roberta-base", batch_size=32, rank=768, alpha=768.0, preset="roberta",
                              warmup_ratio=0.06)
    assert (vit.TABLE_IX["lr"], vit.TABLE_IX["batch_size"], vit.TABLE_IX["epochs"], vit.TABLE_IX["rank"]) == (
        3e-3, 128, 10, 768)


def test_metrics():
    preds, labels = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0])
    assert glue.score("accuracy", preds, labels) == 0.75
    assert glue.score("matthews", preds, labels) == pytest.approx(2 / 12 ** 0.5)  # (tp tn - fp fn) / sqrt(...)
    assert glue.score("matthews", torch.zeros(4, dtype=torch.long), labels) == 0.0  # constant predictions
    assert glue.score("pearson", torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2])) == pytest.approx(0.5)


@pytest.mark.slow
def test_glue_sst2_trains_saves_and_reloads(tmp_path):
    model_dir = glue.save_tiny_roberta(tmp_path / "tiny", num_labels=2)
    train, val = glue.synthetic_glue("sst2", 64, seed=0), glue.synthetic_glue("sst2", 32, seed=1)
    result = glue.run_glue("sst2", train, val, model_dir, lr=1e-2, epochs=5, batch_size=8,
                           output_dir=str(tmp_path / "out"), log=lambda s: None)
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result["best"] >= 0.9 and result["trainable"]["loldu_params"] == 4 * 33  # 2 layers x (q, v), r = 32

    # the adapter file carries the trained head: a fresh copy of the base scores what the last epoch scored
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    load_transformer_adapter(result["adapter"], model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(**tok([r["sentence"] for r in val], padding=True, return_tensors="pt")).logits
    accuracy = glue.score("accuracy", logits.argmax(-1), torch.tensor([r["label"] for r in val]))
    assert accuracy == pytest.approx(result["final"])


def test_glue_regression_task_uses_table_vii_defaults(tmp_path):
    model_dir = glue.save_tiny_roberta(tmp_path / "tiny", num_labels=1)
    train, val = glue.synthetic_glue("stsb", 16, seed=0), glue.synthetic_glue("stsb", 8, seed=1)
    result = glue.run_glue("stsb", train, val, model_dir, batch_size=8, max_steps=2, log=lambda s: None)
    assert (result["lr"], result["epochs"], result["metric"]) == (2e-4, 30, "pearson")
    assert len(result["history"]) == 1 and -1 <= result["best"] <= 1  # max_steps stops within the first epoch


@pytest.mark.slow
def test_vit_cli_synthetic(tmp_path, capsys):
    result = vit.main(["--dataset", "cifar10", "--synthetic", "--epochs", "3", "--output-dir", str(tmp_path)])
    assert result["best"] >= 0.9 and (tmp_path / "vit.safetensors").is_file()
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert "cifar10: best accuracy" in capsys.readouterr().out


def test_to_pixels_accepts_arrays_tensors_and_pil():
    from PIL import Image

    array = vit.synthetic_images(1, 3, size=32)[0]["img"]
    a = vit.to_pixels(array, 16)
    b = vit.to_pixels(Image.fromarray(array), 16)
    c = vit.to_pixels(torch.from_numpy(array).permute(2, 0, 1).float() / 255, 16)
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and torch.allclose(a, c)


def test_missing_datasets_gives_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit, match=r"pip install \"loldu-sd\[datasets\]\""):
        glue.main(["--task", "sst2"])
    with pytest.raises(SystemExit, match="--synthetic"):
        vit.main(["--dataset", "cifar10"])


def test_llama_injection_benchmark_smoke():
    result = bench_llama.llama_injection_benchmark(smoke=True)
    assert (result["n_matrices"], result["size"], result["rank"]) == (4, 256, 64)
    assert result["top_r_ldu_s_per_matrix"] > 0 and result["full_lu_s_per_matrix"] > 0
    assert result["max_pivot_diff_vs_full_lu"] < 1e-4
    assert "extrapolated_to_64_matrices" not in result
