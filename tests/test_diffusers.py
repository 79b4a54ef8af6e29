"""Stable Diffusion integration: pipeline methods, identity, mixing, fuse, export to LoRA, bad input."""
import copy

import pytest
import torch

import loldu_sd
from loldu_sd import LoLDUConfig, LoLDUFormatError, LoLDUBaseMismatchError

pytest.importorskip("diffusers")
import loldu_sd.diffusers  # noqa: E402
from loldu_sd.diffusers import add_loldu_to_pipeline, add_loldu_to_text_encoder, add_loldu_to_unet  # noqa: E402
from loldu_sd.diffusers import export_lora, pipeline_components, unet_target_layers  # noqa: E402
from loldu_sd.testing import tiny_pipeline, update_errors  # noqa: E402


def images(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 2)
    out = pipe("a photo of sks toy", generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    return torch.from_numpy(out.images)


def randomise(module, name, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loldu_sd.loldu_parameters(module, name):
            if p.ndim:
                p.add_(torch.randn(p.shape, generator=g) * std * 0.1)  # dz starts at 0


@pytest.fixture(scope="module")
def base():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, images(pipe)


@pytest.fixture
def pipe(base):
    p, _ = base
    yield p
    p.unfuse_loldu()
    p.unload_loldu_weights()
    # diffusers keeps the last cross_attention_kwargs scale in pipe._lora_scale and applies it to text-encoder LoRAs
    # loaded later (load_lora_weights(lora_scale=self.lora_scale)); reset it so tests stay independent
    p.__dict__.pop("_lora_scale", None)


def add(pipe, name, rank=4, text=False, seed=1):
    add_loldu_to_pipeline(pipe, LoLDUConfig(rank=rank), name, text_encoders=text)
    if text:
        randomise(pipe.text_encoder, name, seed=seed)
    randomise(pipe.unet, name, seed=seed)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def roundoff(*dtypes):
    """Unit roundoff of the coarsest of `dtypes`."""
    return max(torch.finfo(d).eps / 2 for d in dtypes)


@pytest.mark.parametrize("made_dtype", DTYPES)
def test_adapter_made_in_one_precision_loads_in_every_precision(base, made_dtype, tmp_path):
    src = copy.deepcopy(base[0]).to(dtype=made_dtype)
    add(src, "a", rank=32, text=True)
    src.save_loldu_weights(tmp_path)
    for loaded_dtype in DTYPES:
        copy_ = copy.deepcopy(base[0]).to(dtype=loaded_dtype)
        copy_.load_loldu_weights(tmp_path)
        for comp in ("unet", "text_encoder"):
            errors = update_errors(getattr(src, comp), getattr(copy_, comp), "a")
            assert len(errors) > 0 and max(errors.values()) <= 16 * roundoff(made_dtype, loaded_dtype), (
                comp, made_dtype, loaded_dtype, max(errors.values()) / roundoff(made_dtype, loaded_dtype))


def test_targets_are_every_attention_projection(base):
    pipe, _ = base
    names = unet_target_layers(pipe.unet)
    n_attn = len(pipe.unet.attn_processors)
    assert len(names) == 4 * n_attn and any(".attn2.to_k" in n for n in names)


def test_identity_at_init_and_changed_z_changes_images(pipe, base):
    add_loldu_to_unet(pipe.unet, LoLDUConfig(rank=4), "a")
    add_loldu_to_text_encoder(pipe.text_encoder, LoLDUConfig(rank=4), "a")
    assert torch.equal(images(pipe), base[1])
    randomise(pipe.unet, "a")
    assert not torch.allclose(images(pipe), base[1], atol=1e-3)


def test_save_unload_load_roundtrip(pipe, base, tmp_path):
    add(pipe, "a", text=True)
    ref = images(pipe)
    path = pipe.save_loldu_weights(tmp_path)
    assert path.name == "pytorch_loldu_weights.safetensors" and path.stat().st_size < 20_000
    pipe.unload_loldu_weights()
    assert torch.equal(images(pipe), base[1])
    assert pipe.load_loldu_weights(tmp_path) == "a"
    assert torch.equal(images(pipe), ref)
    assert pipe.list_loldu_adapters() == {"unet": ["a"], "text_encoder": ["a"]}


def hooks(module):
    """How many forward pre-hooks and forward hooks the module holds."""
    return len(module._forward_pre_hooks), len(module._forward_hooks)


def test_unload_and_deleting_the_last_adapter_leave_no_unet_hooks_behind(pipe, base, tmp_path):
    pipe.unload_loldu_weights()
    bare = hooks(pipe.unet)
    add(pipe, "a", text=True)
    pipe.save_loldu_weights(tmp_path)
    pipe.unload_loldu_weights()
    for _ in range(2):  # unload, then delete the last one: both leave the UNet as loaded
        assert hooks(pipe.unet) == bare
        assert torch.equal(images(pipe, cross_attention_kwargs={"scale": 0.5}), base[1])
        pipe.load_loldu_weights(tmp_path, adapter_name="x")
        assert hooks(pipe.unet) != bare  # the scale hooks are back with an adapter
        pipe.delete_loldu_adapters("x")


def test_regex_targets_follow_the_cross_attention_scale(pipe, base):
    """A regex target_modules adds adapters like a suffix list does, runtime scale included."""
    add_loldu_to_unet(pipe.unet, LoLDUConfig(rank=4, target_modules=r".*attn\d\.to_[qkv]"), "a")
    randomise(pipe.unet, "a")
    assert not torch.allclose(images(pipe), base[1], atol=1e-3)
    assert torch.equal(images(pipe, cross_attention_kwargs={"scale": 0.0}), base[1])
    half = images(pipe, cross_attention_kwargs={"scale": 0.5})
    pipe.set_loldu_adapters("a", 0.5)
    assert torch.allclose(images(pipe), half, atol=1e-6)


def test_runtime_scale_matches_weight(pipe, base):
    add(pipe, "a", text=True)
    scaled = images(pipe, cross_attention_kwargs={"scale": 0.5})
    pipe.set_loldu_adapters("a", 0.5)
    assert torch.allclose(scaled, images(pipe), atol=1e-6)
    pipe.set_loldu_adapters("a", 1.0)
    assert not torch.allclose(scaled, images(pipe), atol=1e-4)
    assert torch.equal(images(pipe, cross_attention_kwargs={"scale": 0.0}), base[1])


def test_two_adapters_mix_as_weighted_sum(pipe, tmp_path):
    add(pipe, "a", rank=4, seed=1)
    add(pipe, "b", rank=8, seed=2)
    pipe.set_loldu_adapters(["a", "b"], [0.7, 0.4])
    assert pipe.get_loldu_adapters() == {"a": 0.7, "b": 0.4}
    mixed = images(pipe)
    # the same delta written as ONE adapter: merge 0.7*a + 0.4*b into the weights and compare
    pipe.fuse_loldu()
    assert torch.allclose(images(pipe), mixed, atol=1e-5)
    pipe.unfuse_loldu()
    pipe.delete_loldu_adapters("a")
    assert pipe.list_loldu_adapters() == {"unet": ["b"]}


def test_fuse_matches_and_unfuse_is_bit_exact(pipe, base):
    add(pipe, "a", text=True)
    unet_w = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "loldu" not in k}
    ref = images(pipe)
    pipe.fuse_loldu()
    assert torch.allclose(images(pipe), ref, atol=1e-5)
    pipe.unfuse_loldu()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_w.items())
    pipe.unload_loldu_weights()
    assert torch.equal(images(pipe), base[1])


def test_load_after_fuse_is_supported(pipe, base, tmp_path):
    add(pipe, "a")
    pipe.save_loldu_weights(tmp_path / "a")
    add(pipe, "b", seed=3)
    pipe.set_loldu_adapters(["a", "b"])
    both = images(pipe)
    pipe.delete_loldu_adapters("a")
    pipe.set_loldu_adapters("b")
    pipe.fuse_loldu()
    with pytest.warns(UserWarning, match="active on top of them"):  # exact, but said
        pipe.load_loldu_weights(tmp_path / "a")  # decomposed from the unfused base weights, added on top
    assert torch.allclose(images(pipe), both, atol=1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_lora_loads_with_stock_diffusers(pipe, tmp_path, fmt):
    pytest.importorskip("peft")
    add(pipe, "a", text=True)
    ref = images(pipe)
    out = export_lora(pipe, tmp_path / f"lora_{fmt}.safetensors", format=fmt)
    pipe.unload_loldu_weights()
    pipe.load_lora_weights(str(out), adapter_name="exported")
    try:
        assert torch.allclose(images(pipe), ref, atol=1e-4)
    finally:
        pipe.unload_lora_weights()


def test_every_attention_processor_gives_same_images(pipe):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    add(pipe, "a")
    ref = images(pipe)
    try:
        for proc in (AttnProcessor(), SlicedAttnProcessor(slice_size=1)):
            pipe.unet.set_attn_processor(proc)
            assert torch.allclose(images(pipe), ref, atol=1e-5), type(proc).__name__
        try:
            import xformers  # noqa: F401
        except ImportError:
            pass
        else:
            pipe.enable_xformers_memory_efficient_attention()
            assert torch.allclose(images(pipe), ref, atol=1e-3)
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_refuses_other_base_model_and_leaves_pipeline_unchanged(pipe, base, tmp_path):
    other = tiny_pipeline(seed=1)
    add_loldu_to_unet(other.unet, LoLDUConfig(rank=4), "x")
    other.save_loldu_weights(tmp_path)
    with pytest.raises(LoLDUBaseMismatchError, match="different base model.*first mismatching layer"):
        pipe.load_loldu_weights(tmp_path)
    assert pipe.list_loldu_adapters() == {} and torch.equal(images(pipe), base[1])


def test_refuses_missing_targets_name_collision_and_lora_files(pipe, tmp_path):
    from safetensors.torch import load_file, save_file
    import json
    from safetensors import safe_open

    add(pipe, "a")
    path = pipe.save_loldu_weights(tmp_path)
    with pytest.raises(LoLDUFormatError, match="already loaded"):
        pipe.load_loldu_weights(path)
    # targets the pipeline does not have
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["layers"])
    layers["unet"][0][0] = "down_blocks.9.attentions.0.to_q"
    meta["layers"] = json.dumps(layers)
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(LoLDUFormatError, match="down_blocks.9"):
        pipe.load_loldu_weights(tmp_path / "bad.safetensors", adapter_name="z")
    lora = export_lora(pipe, tmp_path / "lora.safetensors")
    with pytest.raises(LoLDUFormatError, match="LoRA file.*load_lora_weights"):
        pipe.load_loldu_weights(lora, adapter_name="z")
    assert pipe.list_loldu_adapters() == {"unet": ["a"]}


def test_missing_local_path_and_offline_hub(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no such adapter"):
        pipe.load_loldu_weights(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache|Hub"):
        pipe.load_loldu_weights("someone/some-loldu-adapter")


def test_methods_come_from_one_explicit_import_on_sd_pipeline_classes():
    """`import loldu_sd` leaves diffusers alone; `import loldu_sd.diffusers` gives SD/SDXL pipelines the methods."""
    import subprocess
    import sys

    code = "; ".join([
        "import loldu_sd, diffusers",
        "from diffusers import StableDiffusionPipeline as T, StableDiffusionXLPipeline as X, FluxPipeline as F",
        "assert not any(hasattr(c, 'load_loldu_weights') for c in (T, X, F))",
        "import loldu_sd.diffusers",
        "from diffusers import StableDiffusionImg2ImgPipeline as I, StableDiffusionInpaintPipeline as P",
        "assert all(c.load_loldu_weights is loldu_sd.diffusers.load_loldu_weights for c in (T, X, I, P))",
        "assert not hasattr(F, 'load_loldu_weights') and not hasattr(diffusers.DiffusionPipeline, 'fuse_loldu')"])
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sdxl_two_text_encoders_save_load_and_runtime_scale(tmp_path):
    """SDXL: adapters on the UNet and both text encoders; exact at init, file round trip, cross_attention_kwargs."""
    from loldu_sd.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    ref = images(pipe)
    cfg = LoLDUConfig(rank=4)
    add_loldu_to_pipeline(pipe, cfg, "a", text_encoders=True)
    assert torch.equal(images(pipe), ref)
    for i, module in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
        randomise(module, "a", seed=i + 1)
    trained = images(pipe)
    assert not torch.allclose(trained, ref, atol=1e-3)
    assert torch.equal(images(pipe, cross_attention_kwargs={"scale": 0.0}), ref)
    half = images(pipe, cross_attention_kwargs={"scale": 0.5})
    pipe.set_loldu_adapters("a", 0.5)
    assert torch.allclose(images(pipe), half, atol=1e-6)
    pipe.set_loldu_adapters("a", 1.0)
    path = pipe.save_loldu_weights(tmp_path)
    pipe.unload_loldu_weights()
    assert torch.equal(images(pipe), ref)
    assert pipe.load_loldu_weights(path) == "a"
    assert pipe.list_loldu_adapters() == {"unet": ["a"], "text_encoder": ["a"], "text_encoder_2": ["a"]}
    assert torch.equal(images(pipe), trained)


# ---- export keys: what diffusers, its kohya converter and ComfyUI read --------------------------------------------
KOHYA_PARTS = r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
KOHYA_UNET = r"^lora_unet_(down_blocks|mid_block|up_blocks)_\w+_(to_q|to_k|to_v|to_out_0)" + KOHYA_PARTS
# diffusers' converter and ComfyUI's key map read text encoders as text_model_encoder_layers_N_..., under lora_te_
# (SD 1/2) or lora_te1_ / lora_te2_ (SDXL's two encoders)
KOHYA_TE = r"^lora_{te}_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj" + KOHYA_PARTS


def sdxl_with_adapter():
    from loldu_sd.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    add_loldu_to_unet(pipe.unet, LoLDUConfig(rank=4), "a")
    for i, encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2)):
        add_loldu_to_text_encoder(encoder, LoLDUConfig(rank=4), "a")
        randomise(encoder, "a", seed=i + 2)
    randomise(pipe.unet, "a")
    return pipe


def peft_lora_keys(kind, tmp_path) -> set[str]:
    """Keys of diffusers' own save_lora_weights for a peft LoRA on the layers we adapt, on a fresh pipeline."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from diffusers.utils import convert_state_dict_to_diffusers
    from loldu_sd.testing import tiny_sdxl_pipeline

    pipe, layers = tiny_pipeline(seed=0) if kind == "sd" else tiny_sdxl_pipeline(seed=0), {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if comp == "unet" else ["q_proj", "k_proj", "v_proj", "out_proj"]
        inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), module, adapter_name="peft")
        state = get_peft_model_state_dict(module, adapter_name="peft")
        layers[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(state)
    type(pipe).save_lora_weights(tmp_path / "peft", **layers)
    with safe_open(str(tmp_path / "peft" / "pytorch_lora_weights.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_diffusers_export_keys_are_those_of_diffusers_own_lora_save(pipe, kind, tmp_path):
    pytest.importorskip("peft")
    p = pipe if kind == "sd" else sdxl_with_adapter()
    if kind == "sd":
        add(p, "a", text=True)
    ours = set(loldu_sd.diffusers.export_lora_state_dict(pipeline_components(p), "a", "diffusers"))
    assert ours == peft_lora_keys(kind, tmp_path)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_export_keys_follow_the_canonical_form(pipe, kind):
    import re

    p = pipe if kind == "sd" else sdxl_with_adapter()
    if kind == "sd":
        add(p, "a", text=True)
    keys = set(loldu_sd.diffusers.export_lora_state_dict(pipeline_components(p), "a", "kohya"))
    encoders = ["te"] if kind == "sd" else ["te1", "te2"]
    patterns = [KOHYA_UNET] + [KOHYA_TE.format(te=te) for te in encoders]
    assert all(any(re.match(pat, k) for pat in patterns) for k in keys), sorted(keys)[:5]
    for pat in patterns:  # every component is exported
        assert any(re.match(pat, k) for k in keys), pat


def test_export_to_a_path_without_suffix_writes_a_folder_stock_diffusers_reads(pipe, base, tmp_path):
    pytest.importorskip("peft")
    add(pipe, "a", text=True)
    ref = images(pipe)
    out = export_lora(pipe, tmp_path / "robot_lora")
    assert out == tmp_path / "robot_lora" / "pytorch_lora_weights.safetensors" and out.is_file()
    pipe.unload_loldu_weights()
    pipe.load_lora_weights(tmp_path / "robot_lora", adapter_name="exported")
    try:
        assert torch.allclose(images(pipe), ref, atol=1e-4)
    finally:
        pipe.unload_lora_weights()


def test_adapter_files_name_text_encoder_layers_as_checkpoints_do(pipe, tmp_path):
    import json

    from safetensors import safe_open

    add(pipe, "a", text=True)
    ref = images(pipe)
    path = pipe.save_loldu_weights(tmp_path)
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
    assert layers["text_encoder"] and all(n.startswith("text_model.encoder.layers.") for n, _ in layers["text_encoder"])
    pipe.unload_loldu_weights()
    pipe.load_loldu_weights(path)
    assert torch.equal(images(pipe), ref)


def test_deleting_a_later_fused_adapter_keeps_the_earlier_fused_at_its_own_scale(pipe, tmp_path):
    add(pipe, "a", seed=1)
    pipe.save_loldu_weights(tmp_path / "a", adapter_name="a")
    add(pipe, "b", seed=2)
    pipe.save_loldu_weights(tmp_path / "b", adapter_name="b")
    pipe.unload_loldu_weights()
    pipe.load_loldu_weights(tmp_path / "a")
    pipe.fuse_loldu()
    a_alone = images(pipe)
    with pytest.warns(UserWarning, match=r"adapters \['a'\] are fused into the weights; 'b' is active on top"):
        pipe.load_loldu_weights(tmp_path / "b")
    pipe.fuse_loldu(scale=0.5)
    pipe.delete_loldu_adapters("b")
    assert torch.equal(images(pipe), a_alone)  # 'a' fused at 1.0, as it was, not at the last fuse's 0.5


@pytest.mark.parametrize("call, match", [
    (lambda p: p.set_loldu_adapters(["a", "b"], [1.0, float("nan")]), "weight of adapter 'b' must be a finite"),
    (lambda p: p.set_loldu_adapters(["a", "a"], [1.0, 0.5]), r"\['a'\] given twice"),
    (lambda p: p.fuse_loldu(scale=float("nan")), "fuse scale must be a number between -100 and 100, got nan"),
    (lambda p: p(["x"], num_inference_steps=1, cross_attention_kwargs={"scale": float("inf")}), "must be a number"),
    # bounded: 1e30 gave all-NaN images
    (lambda p: p.set_loldu_adapters(["a", "b"], [1.0, 1e30]), "weight of adapter 'b' must be a number between"),
    (lambda p: p.fuse_loldu(scale=1e30), "fuse scale must be a number between"),
    (lambda p: p(["x"], num_inference_steps=1, cross_attention_kwargs={"scale": 1e30}), r"scale \(cross_attention_kw"),
    # a fuse that would do nothing, or something else than asked, says so
    (lambda p: p.fuse_loldu(adapter_names=["nope"]), r"fuse_loldu: unknown LoLDU adapter 'nope'; loaded: \['a', 'b'\]"),
    (lambda p: p.fuse_loldu(components=["vae2"]), r"fuse_loldu: no component 'vae2' with LoLDU adapters here"),
    (lambda p: (p.set_loldu_adapters([]), p.fuse_loldu()), "fuse_loldu: no active adapter"),
])
def test_nan_weights_and_scales_and_repeated_names_are_refused_and_change_nothing(call, match, pipe):
    add(pipe, "a", text=True)
    add(pipe, "b", seed=2)
    pipe.set_loldu_adapters(["a", "b"], [0.7, 0.4])
    before = images(pipe)
    with pytest.raises(ValueError, match=match) as e:
        call(pipe)
    assert "\n" not in str(e.value)
    pipe.set_loldu_adapters(["a", "b"], [0.7, 0.4])
    assert torch.equal(images(pipe), before)


def test_a_second_fuse_at_another_scale_is_refused_not_ignored(pipe):
    add(pipe, "a")
    pipe.fuse_loldu()
    fused = images(pipe)
    for call in (lambda: pipe.fuse_loldu(scale=0.5), lambda: pipe.fuse_loldu(adapter_names=["a"], scale=0.5)):
        with pytest.raises(ValueError, match=r"'a'.* already fused; to fuse (it )?at another scale, call unfuse_loldu"):
            call()
    assert torch.equal(images(pipe), fused)
    pipe.unfuse_loldu()
    pipe.fuse_loldu(scale=0.5)
    assert not torch.equal(images(pipe), fused)
