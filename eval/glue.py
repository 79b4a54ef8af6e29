"""GLUE recipe (paper Table VII): RoBERTa-base with LoLDU on query/value, a fully trained head, plain PyTorch loop.

    pip install "loldu-sd[datasets]"
    python -m eval.glue --task sst2                      # Table VII defaults: lr 4e-4, 10 epochs, max length 128
    python -m eval.glue --task sst2 --synthetic          # offline smoke run: tiny random RoBERTa, synthetic sentences

Every optimizer step is followed by project_loldu_ (the paper's projected gradient step). The score is the best
epoch on the validation split (as in the paper, which reports the median of 5 seeds: run --seed 1..5).
`fit` below is shared with eval.vit.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from loldu_sd import project_loldu_
from loldu_sd.transformers import add_loldu_to_transformer, save_transformer_adapter

# Table VII: task -> (lr, epochs, max length); shared: batch 32, rank 768, alpha 768, query+value, warmup 0.06
TABLE_VII = {"mnli": (3e-4, 10, 128), "sst2": (4e-4, 10, 128), "mrpc": (3e-4, 20, 512), "cola": (2e-4, 20, 128),
             "qnli": (2e-4, 10, 512), "qqp": (3e-4, 20, 512), "rte": (4e-4, 20, 512), "stsb": (2e-4, 30, 512)}
PAPER = dict(model="roberta-base", batch_size=32, rank=768, alpha=768.0, preset="roberta", warmup_ratio=0.06)
# task -> (text fields, num_labels, metric, validation split)
TASKS = {"sst2": (("sentence", None), 2, "accuracy", "validation"),
         "cola": (("sentence", None), 2, "matthews", "validation"),
         "mrpc": (("sentence1", "sentence2"), 2, "accuracy", "validation"),
         "rte": (("sentence1", "sentence2"), 2, "accuracy", "validation"),
         "stsb": (("sentence1", "sentence2"), 1, "pearson", "validation"),
         "qnli": (("question", "sentence"), 2, "accuracy", "validation"),
         "qqp": (("question1", "question2"), 2, "accuracy", "validation"),
         "mnli": (("premise", "hypothesis"), 3, "accuracy", "validation_matched")}


def require_datasets():
    """Import `datasets` (an optional extra) with an actionable error."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("eval: this recipe needs the optional `datasets` package: pip install \"loldu-sd[datasets]\" "
                         "(or run with --synthetic for an offline smoke test)") from None
    return datasets


def load_glue(task: str):
    """(train, validation) splits of a GLUE task from the Hugging Face Hub."""
    splits = require_datasets().load_dataset("nyu-mll/glue", task)
    return splits["train"], splits[TASKS[task][3]]


def score(metric: str, preds: torch.Tensor, labels: torch.Tensor) -> float:
    """accuracy, matthews (CoLA) or pearson (STS-B), as the paper reports them."""
    if metric == "pearson":
        return float(torch.corrcoef(torch.stack([preds.double(), labels.double()]))[0, 1])
    if metric == "accuracy":
        return float((preds == labels).double().mean())
    k = int(max(preds.max(), labels.max())) + 1  # Matthews correlation from the confusion matrix
    cm = torch.bincount(labels * k + preds, minlength=k * k).view(k, k).double()
    s, c = cm.sum(), cm.diagonal().sum()
    p, t = cm.sum(0), cm.sum(1)
    denom = math.sqrt(float((s * s - p @ p) * (s * s - t @ t)))
    return float((c * s - p @ t) / denom) if denom > 0 else 0.0


def fit(model, train_set, collate, evaluate, *, epochs: int, lr: float, batch_size: int, warmup: float | int,
        device: str = "cpu", bf16: bool = False, max_steps: int | None = None, seed: int = 42, log=print) -> dict:
    """AdamW + linear warmup/decay on the trainable tensors, project_loldu_ after each step, evaluate every epoch."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    # no weight decay: decaying z towards 0 would remove the top-r part of W0 itself (the delta is sigma z - sigma0 z0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    warmup_steps = int(warmup * total) if isinstance(warmup, float) else warmup  # ratio (GLUE) or steps (ViT)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total)
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            project_loldu_(model)
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        model.eval()
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            result = evaluate(model)
        history.append({"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1), **result})
        log(json.dumps(history[-1]))
        if step >= total:
            break
    best = max(history, key=lambda h: h["score"])
    return {"best": best["score"], "best_epoch": best["epoch"], "final": history[-1]["score"], "history": history}


def predict(model, eval_set, collate, batch_size: int, device: str, regression: bool):
    """(predictions, labels) over a whole evaluation set."""
    preds, labels = [], []
    for batch in DataLoader(eval_set, batch_size=batch_size, collate_fn=collate):
        labels.append(batch.pop("labels"))
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        preds.append(logits[:, 0] if regression else logits.argmax(-1))
    return torch.cat(preds), torch.cat(labels)


def run_glue(task: str, train_set, eval_set, model_name_or_path: str = PAPER["model"], *, lr: float | None = None,
             epochs: int | None = None, max_length: int | None = None, batch_size: int = PAPER["batch_size"],
             rank: int = PAPER["rank"], alpha: float = PAPER["alpha"], init: str = "ldu", all_attention: bool = False,
             warmup_ratio: float = PAPER["warmup_ratio"], seed: int = 42, device: str = "cpu", bf16: bool = False,
             max_steps: int | None = None, output_dir: str | None = None, log=print) -> dict:
    """Fine-tune with LoLDU on (train_set, eval_set): indexable rows {text fields..., "label"}; returns the scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASKS:
        raise SystemExit(f"eval.glue: unknown task {task!r}; choose one of {sorted(TASKS)}")
    (key1, key2), num_labels, metric, _ = TASKS[task]
    lr, epochs, max_length = (lr or TABLE_VII[task][0], epochs or TABLE_VII[task][1], max_length or TABLE_VII[task][2])
    random.seed(seed)
    torch.manual_seed(seed)  # the new classifier head's init
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=num_labels).to(device)
    report = add_loldu_to_transformer(model, PAPER["preset"], rank=rank, alpha=alpha, init=init,
                                      all_attention=all_attention)
    log(str(report))
    max_length = min(max_length, tokenizer.model_max_length)

    def collate(rows):
        texts = [[r[key1] for r in rows]] + ([[r[key2] for r in rows]] if key2 else [])
        batch = dict(tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.float if num_labels == 1 else torch.long)
        return batch

    def evaluate(m):
        preds, labels = predict(m, eval_set, collate, 2 * batch_size, device, regression=num_labels == 1)
        return {"score": score(metric, preds, labels)}

    result = fit(model, train_set, collate, evaluate, epochs=epochs, lr=lr, batch_size=batch_size,
                 warmup=warmup_ratio, device=device, bf16=bf16, max_steps=max_steps, seed=seed, log=log)
    result.update(task=task, metric=metric, lr=lr, epochs=epochs, max_length=max_length, trainable=report.to_dict())
    if output_dir:
        out = Path(output_dir)
        path = save_transformer_adapter(out / f"{task}.safetensors", model, metadata={"task": task})
        result["adapter"] = str(path)
        (out / f"{task}.json").write_text(json.dumps(result, indent=2))
    return result


# ---- offline smoke runs: a tiny random RoBERTa with a word-level tokenizer, sentences with one class keyword --------
KEYWORDS = [["good", "great", "fine"], ["bad", "awful", "poor"], ["maybe", "perhaps", "unsure"]]
FILLER = ["the", "a", "film", "plot", "was", "very", "and", "it", "cast", "story", "quite", "really"]


def synthetic_glue(task: str, n: int = 64, seed: int = 0) -> list[dict]:
    """n rows of a task's schema: the last text field is mostly keywords of the row's class, plus two fillers."""
    rng = random.Random(seed)
    (key1, key2), num_labels, _, _ = TASKS[task]
    rows = []
    for i in range(n):
        c = i % max(num_labels, 2)
        words = [rng.choice(KEYWORDS[c]) for _ in range(4)] + rng.sample(FILLER, 2)
        rng.shuffle(words)
        row = {key1: " ".join(rng.sample(FILLER, 4)), key2: " ".join(words)} if key2 else {key1: " ".join(words)}
        row["label"] = float(1 + 3 * c) if num_labels == 1 else c  # STS-B-like scores 1.0 / 4.0
        rows.append(row)
    return rows


def save_tiny_roberta(path: str | Path, num_labels: int = 2, seed: int = 0) -> str:
    """Write a tiny random RobertaForSequenceClassification and a word-level tokenizer for the synthetic words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    words = ["<pad>", "<s>", "</s>", "<unk>"] + FILLER + [w for ws in KEYWORDS for w in ws]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", model_max_length=64).save_pretrained(path)
    torch.manual_seed(seed)
    # initializer_range 0.2, not 0.02: at 0.02 a random 2-layer model's <s> state barely depends on the other tokens
    config = RobertaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=72, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, num_labels=num_labels, initializer_range=0.2)
    RobertaForSequenceClassification(config).save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    """Command line: python -m eval.glue --task sst2 [--synthetic] [...]."""
    p = argparse.ArgumentParser(prog="python -m eval.glue", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--model", default=PAPER["model"], help="name or local path (default: roberta-base)")
    p.add_argument("--lr", type=float, help="default: Table VII for the task")
    p.add_argument("--epochs", type=int, help="default: Table VII for the task")
    p.add_argument("--max-length", type=int, help="default: Table VII for the task")
    p.add_argument("--batch-size", type=int, help=f"default: {PAPER['batch_size']}")
    p.add_argument("--rank", type=int, default=PAPER["rank"])
    p.add_argument("--alpha", type=float, default=PAPER["alpha"])
    p.add_argument("--init", default="ldu")
    p.add_argument("--all-attention", action="store_true", help="adapt query, key, value and output.dense")
    p.add_argument("--warmup-ratio", type=float, default=PAPER["warmup_ratio"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--max-steps", type=int, help="stop early (debugging)")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--output-dir", help="write <task>.safetensors (adapter + head) and <task>.json here")
    p.add_argument("--synthetic", action="store_true", help="offline: tiny random RoBERTa, 64 synthetic rows")
    a = p.parse_args(argv)
    if a.synthetic:  # 64 rows: Table VII's lr and batch would take only a few small steps, so use larger ones
        import tempfile

        model = save_tiny_roberta(tempfile.mkdtemp(prefix="loldu-glue-"), TASKS[a.task][1])
        train, val = synthetic_glue(a.task, 64, seed=0), synthetic_glue(a.task, 32, seed=1)
        a.lr, a.epochs, a.batch_size = a.lr or 1e-2, a.epochs or 6, a.batch_size or 8
    else:
        model, (train, val) = a.model, load_glue(a.task)
    if a.max_train_samples:
        train = train.select(range(a.max_train_samples)) if hasattr(train, "select") else train[: a.max_train_samples]
    result = run_glue(a.task, train, val, model, lr=a.lr, epochs=a.epochs, max_length=a.max_length,
                      batch_size=a.batch_size or PAPER["batch_size"], rank=a.rank, alpha=a.alpha, init=a.init,
                      all_attention=a.all_attention, warmup_ratio=a.warmup_ratio, seed=a.seed, device=a.device,
                      bf16=a.bf16, max_steps=a.max_steps, output_dir=a.output_dir)
    print(f"{a.task}: best {result['metric']} {result['best']:.4f} (epoch {result['best_epoch']})")
    return result


if __name__ == "__main__":
    main()
