"""The denoising objective's options (Min-SNR weighting, offset noise, the text encoder's attention mask) and the
base pipelines the trainer accepts, on the tiny pipeline."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, StableDiffusionImg2ImgPipeline  # noqa: E402

from loldu_sd.testing import save_tiny_pipeline, tiny_pipeline, tiny_sdxl_pipeline  # noqa: E402
from loldu_sd.training import TrainingInputError, diffusion_loss, encode_prompt, parse_args  # noqa: E402
from loldu_sd.training.base import check_trainable_base  # noqa: E402
from loldu_sd.training.conditioning import Conditioner  # noqa: E402
from loldu_sd.training.loss import min_snr_weights  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def loss(pipe, sched, **options):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    embeds = encode_prompt(pipe.text_encoder, pipe.tokenizer, ["a photo of sks robot"] * 2)
    with torch.no_grad():
        return diffusion_loss(pipe.unet, pipe.vae, sched, pixels, embeds, seed=3, streams=[(0, [0, 1])],
                              **options)[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction_type):
    sched, t = scheduler(prediction_type), torch.tensor([0, 10, 300, 999])
    alpha_bar = sched.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + (prediction_type != "epsilon"))
    torch.testing.assert_close(min_snr_weights(sched, t, 5.0).double(), expected, rtol=1e-5, atol=0)


def test_snr_gamma_weights_the_loss_and_a_huge_gamma_changes_nothing(pipe):
    plain = loss(pipe, scheduler())
    assert torch.equal(loss(pipe, scheduler(), snr_gamma=1e12), plain)  # min(snr, gamma) / snr = 1
    assert not torch.allclose(loss(pipe, scheduler(), snr_gamma=1.0), plain)


def test_noise_offset_adds_one_constant_per_sample_and_channel(pipe, monkeypatch):
    seen = []
    sched = scheduler()
    real = sched.add_noise
    monkeypatch.setattr(sched, "add_noise", lambda x, noise, t: seen.append(noise) or real(x, noise, t))
    loss(pipe, sched)
    loss(pipe, sched, noise_offset=0.1)
    added = seen[1] - seen[0]
    assert added.abs().max() > 0
    torch.testing.assert_close(added, added[:, :, :1, :1].expand_as(added), rtol=0, atol=1e-6)
    assert float(added[:, :, 0, 0].abs().max()) < 0.5  # 0.1 x a standard normal draw per (sample, channel)


def test_attention_mask_changes_only_the_padding_positions(pipe):
    prompt = ["a photo of sks robot"]
    n_tokens = len(pipe.tokenizer(prompt[0]).input_ids)
    plain = encode_prompt(pipe.text_encoder, pipe.tokenizer, prompt)
    masked = encode_prompt(pipe.text_encoder, pipe.tokenizer, prompt, use_attention_mask=True)
    # CLIP attends causally, so the prompt's own tokens never see the padding: only the padding positions change
    torch.testing.assert_close(masked[:, :n_tokens], plain[:, :n_tokens])
    assert not torch.allclose(masked[:, n_tokens:], plain[:, n_tokens:])


def test_sample_prediction_is_refused(pipe):
    with pytest.raises(ValueError, match="prediction_type 'sample': training supports epsilon and v_prediction"):
        loss(pipe, scheduler("sample"))


def base_args(path):
    return parse_args(["--pretrained_model_name_or_path", str(path), "--instance_data_dir", "x", "--instance_prompt",
                       "a photo of sks robot"])


def test_trainable_bases_are_decided_from_their_configs(tmp_path):
    sd = save_tiny_pipeline(tmp_path / "sd")
    assert check_trainable_base(base_args(sd)) == "StableDiffusionPipeline"
    config = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(TrainingInputError, match=r"sd: its scheduler predicts 'sample'; the trainer supports epsilon"):
        check_trainable_base(base_args(sd))
    with pytest.raises(TrainingInputError, match="cannot read its pipeline config"):
        check_trainable_base(base_args(tmp_path / "missing"))


def test_sdxl_is_trainable_and_other_pipeline_classes_are_refused_naming_the_class(tmp_path):
    sdxl = save_tiny_pipeline(tmp_path / "sdxl", sdxl=True)
    assert check_trainable_base(base_args(sdxl)) == "StableDiffusionXLPipeline"
    StableDiffusionImg2ImgPipeline(**tiny_pipeline().components).save_pretrained(tmp_path / "img2img")
    with pytest.raises(TrainingInputError, match="a StableDiffusionImg2ImgPipeline; the trainer trains"):
        check_trainable_base(base_args(tmp_path / "img2img"))


def test_sdxl_conditioning_equals_the_pipelines_own_prompt_encoding():
    pipe = tiny_sdxl_pipeline(seed=0)
    conditioner = Conditioner(pipe, {}, False, torch.device("cpu"), torch.float32)
    time_ids = torch.tensor([[80.0, 64.0, 0.0, 8.0, 64.0, 64.0]])
    embeds, kwargs = conditioner(["a photo of sks robot"], time_ids)
    with torch.no_grad():
        ref, _, pooled, _ = pipe.encode_prompt("a photo of sks robot", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ref)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"], time_ids)
