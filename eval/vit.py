"""Image classification recipe (paper Table IX): ViT-B/16 (ImageNet-21k) with LoLDU on query/value, trained head.

    pip install "loldu-sd[datasets]"
    python -m eval.vit --dataset cifar10                 # Table IX: lr 3e-3, batch 128, 10 epochs, bf16, rank 768
    python -m eval.vit --dataset cifar10 --synthetic     # offline smoke run: tiny random ViT, coloured noise images

Images are resized to the model's input size and normalised with mean = std = 0.5 (the in21k ViT's processor);
no augmentation. Accuracy on the test split after each epoch; the best epoch is reported. Shares `fit` with eval.glue.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.glue import fit, predict, require_datasets, score
from loldu_sd.images import to_rgb
from loldu_sd.transformers import add_loldu_to_transformer, save_transformer_adapter

TABLE_IX = dict(model="google/vit-base-patch16-224-in21k", lr=3e-3, batch_size=128, epochs=10, bf16=True,
                warmup_steps=30, preset="vit", rank=768, alpha=768.0, seed=42)
# name -> (Hub dataset id, image column, label column, train split, eval split). Written without Hub access:
# cifar10/cifar100 are the canonical ids; check the others and override with --hf-dataset/--image-column/...
DATASETS = {"cifar10": ("uoft-cs/cifar10", "img", "label", "train", "test"),
            "cifar100": ("uoft-cs/cifar100", "img", "fine_label", "train", "test"),
            "eurosat": ("blanchon/EuroSAT_RGB", "image", "label", "train", "test"),
            "flowers102": ("nelorth/oxford-flowers", "image", "label", "train", "test"),
            "fgvc": ("HuggingFaceM4/FGVC-Aircraft", "image", "variant", "train", "test"),
            "stanfordcars": ("tanganke/stanford_cars", "image", "label", "train", "test")}


def load_images(name: str, hub_id: str | None = None, image_column: str | None = None,
                label_column: str | None = None):
    """(train, eval, num_labels, image_column, label_column) of an image dataset from the Hugging Face Hub."""
    default = DATASETS.get(name, (name, "image", "label", "train", "test"))
    hub_id, image_column, label_column = hub_id or default[0], image_column or default[1], label_column or default[2]
    splits = require_datasets().load_dataset(hub_id)
    train = splits[default[3]]
    test = splits[default[4]] if default[4] in splits else splits["validation"]
    feature = train.features[label_column]
    num_labels = feature.num_classes if hasattr(feature, "num_classes") else len(set(train[label_column]))
    return train, test, num_labels, image_column, label_column


def to_pixels(image, size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """PIL image, HWC uint8 array or CHW float tensor in [0, 1] -> normalised (3, size, size) float tensor."""
    if not isinstance(image, torch.Tensor):
        array = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (image - mean) / std


def run_vit(train_set, eval_set, num_labels: int, model_name_or_path: str = TABLE_IX["model"], *,
            image_column: str = "img", label_column: str = "label", lr: float = TABLE_IX["lr"],
            epochs: int = TABLE_IX["epochs"], batch_size: int = TABLE_IX["batch_size"], rank: int = TABLE_IX["rank"],
            alpha: float = TABLE_IX["alpha"], init: str = "ldu", all_attention: bool = False,
            warmup_steps: int = TABLE_IX["warmup_steps"], seed: int = TABLE_IX["seed"], device: str = "cpu",
            bf16: bool = False, max_steps: int | None = None, output_dir: str | None = None, log=print) -> dict:
    """Fine-tune a ViT with LoLDU on indexable rows {image_column, label_column}; returns the accuracies."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)  # the new classifier head's init
    model = AutoModelForImageClassification.from_pretrained(model_name_or_path, num_labels=num_labels,
                                                            ignore_mismatched_sizes=True).to(device)
    report = add_loldu_to_transformer(model, TABLE_IX["preset"], rank=rank, alpha=alpha, init=init,
                                      all_attention=all_attention)
    log(str(report))
    size = model.config.image_size

    def collate(rows):
        return {"pixel_values": torch.stack([to_pixels(r[image_column], size) for r in rows]),
                "labels": torch.tensor([int(r[label_column]) for r in rows])}

    def evaluate(m):
        preds, labels = predict(m, eval_set, collate, batch_size, device, regression=False)
        return {"score": score("accuracy", preds, labels)}

    result = fit(model, train_set, collate, evaluate, epochs=epochs, lr=lr, batch_size=batch_size,
                 warmup=int(warmup_steps), device=device, bf16=bf16, max_steps=max_steps, seed=seed, log=log)
    result.update(metric="accuracy", lr=lr, epochs=epochs, trainable=report.to_dict())
    if output_dir:
        out = Path(output_dir)
        result["adapter"] = str(save_transformer_adapter(out / "vit.safetensors", model))
        (out / "vit.json").write_text(json.dumps(result, indent=2))
    return result


# ---- offline smoke runs --------------------------------------------------------------------------------------------
def synthetic_images(n: int = 64, num_labels: int = 3, size: int = 32, seed: int = 0) -> list[dict]:
    """n CIFAR-like rows {"img": HWC uint8 array, "label"}: each class has its own mean colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).uniform(40, 215, size=(num_labels, 3))  # fixed across splits
    rows = []
    for i in range(n):
        c = i % num_labels
        img = colours[c] + rng.normal(0, 30, size=(size, size, 3))
        rows.append({"img": np.clip(img, 0, 255).astype(np.uint8), "label": c})
    return rows


def save_tiny_vit(path: str | Path, num_labels: int = 3, seed: int = 0) -> str:
    """Write a tiny random ViTForImageClassification (16x16 input, 4x4 patches) to `path`."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    # initializer_range 0.2: at 0.02 a random model's [CLS] state barely depends on the patches
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=num_labels, initializer_range=0.2)
    ViTForImageClassification(config).save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    """Command line: python -m eval.vit --dataset cifar10 [--synthetic] [...]."""
    p = argparse.ArgumentParser(prog="python -m eval.vit", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)} or a Hub dataset id")
    p.add_argument("--hf-dataset", help="override the Hub id of --dataset")
    p.add_argument("--image-column")
    p.add_argument("--label-column")
    p.add_argument("--model", default=TABLE_IX["model"])
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--rank", type=int, default=TABLE_IX["rank"])
    p.add_argument("--alpha", type=float, default=TABLE_IX["alpha"])
    p.add_argument("--init", default="ldu")
    p.add_argument("--all-attention", action="store_true", help="adapt query, key, value and the output projection")
    p.add_argument("--warmup-steps", type=int, default=TABLE_IX["warmup_steps"])
    p.add_argument("--seed", type=int, default=TABLE_IX["seed"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (Table IX trains in bf16)")
    p.add_argument("--max-steps", type=int, help="stop early (debugging)")
    p.add_argument("--output-dir", help="write vit.safetensors (adapter + head) and vit.json here")
    p.add_argument("--synthetic", action="store_true", help="offline: tiny random ViT, 60 synthetic images")
    a = p.parse_args(argv)
    if a.synthetic:  # few images: Table IX's batch and warmup would leave almost no full-lr steps
        import tempfile

        num_labels, image_column, label_column = 3, "img", "label"
        model = save_tiny_vit(tempfile.mkdtemp(prefix="loldu-vit-"), num_labels)
        train, test = synthetic_images(60, num_labels, seed=0), synthetic_images(30, num_labels, seed=1)
        a.lr, a.epochs, a.batch_size, a.warmup_steps = a.lr or 1e-2, a.epochs or 5, a.batch_size or 10, 2
    else:
        model = a.model
        train, test, num_labels, image_column, label_column = load_images(a.dataset, a.hf_dataset, a.image_column,
                                                                          a.label_column)
    result = run_vit(train, test, num_labels, model, image_column=image_column, label_column=label_column,
                     lr=a.lr or TABLE_IX["lr"], epochs=a.epochs or TABLE_IX["epochs"],
                     batch_size=a.batch_size or TABLE_IX["batch_size"], rank=a.rank, alpha=a.alpha, init=a.init,
                     all_attention=a.all_attention, warmup_steps=a.warmup_steps, seed=a.seed, device=a.device,
                     bf16=not a.fp32, max_steps=a.max_steps, output_dir=a.output_dir)
    print(f"{a.dataset}: best accuracy {result['best']:.4f} (epoch {result['best_epoch']})")
    return result


if __name__ == "__main__":
    main()
