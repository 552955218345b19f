"""The host adapter against Forge's own FLUX, UnetPatcher and sampling path (tier "forge")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_freefuse.core import MaskConfig
from lib_freefuse.forge.host import CaptureBlock, flux_model, layer_stream, patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan

TEXT_TOKENS = 8
WORDS = (((1, 2), (5,)),)  # one image, two subjects


def toy_decode(latents: torch.Tensor) -> torch.Tensor:
    """Stand-in for the VAE: (B, 16, H, W) latents -> (B, 8H, 8W, 3) RGB in [0, 1]."""
    rgb = torch.sigmoid(latents[:, :3])
    return F.interpolate(rgb, scale_factor=8, mode="nearest").permute(0, 2, 3, 1)


class SpyJob(FreeFuseJob):
    """A FreeFuseJob that keeps what it was handed: q/k, and the step and sigma of the capture call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.capture_sigmas: list[float] = []
        self.sigma = None

    def begin_call(self, x, sigma, *args, **kwargs):
        self.sigma = float(sigma.reshape(-1)[0])
        super().begin_call(x, sigma, *args, **kwargs)

    def store_attention(self, q, k):
        super().store_attention(q, k)
        self.stored.append(tuple(t.clone() for t in self._captured))  # the conditional rows the job kept
        self.capture_sigmas.append(self.sigma)


def make_job(words=WORDS, capture_step=1, schedule=None, **plan):
    plan = JobPlan(word_positions=words, text_length=TEXT_TOKENS, capture_step=capture_step, **plan)
    return SpyJob(plan, toy_decode, schedule)


def manual_qk(block, img, txt, vec, heads):
    """q, k of a double block recomputed from its weights: modulation, LayerNorm, qkv, RMS norm (no RoPE)."""

    def stream(prefix, x):
        shift, scale = F.linear(F.silu(vec), *_wb(getattr(block, f"{prefix}_mod").lin))[:, None].chunk(6, -1)[:2]
        x = (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift
        attn = getattr(block, f"{prefix}_attn")
        qkv = F.linear(x, *_wb(attn.qkv)).view(x.shape[0], x.shape[1], 3, heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * s  # noqa: E731
        return rms(q, _scale(attn.norm.query_norm)), rms(k, _scale(attn.norm.key_norm))

    (tq, tk), (iq, ik) = stream("txt", txt), stream("img", img)
    return torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)


def _wb(layer):
    return layer.weight, layer.bias


def _scale(norm):
    """An RMS norm's scale: classic Forge's own RMSNorm calls it `scale`, Neo's torch.nn.RMSNorm `weight`."""
    return norm.scale if hasattr(norm, "scale") else norm.weight


def manual_rope(x, grid_hw, text_tokens, axes_dim, theta=10000, text_axis=None):
    """FLUX's RoPE from first principles: image ids (0, row, col, 0...), text ids zero (FLUX.2: their positions on
    `text_axis`), complex rotation per axis."""
    h, w = grid_hw
    axes = len(axes_dim)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.zeros(h, w, axes)
    image[..., 1], image[..., 2] = rows, cols
    text = torch.zeros(text_tokens, axes)
    if text_axis is not None:
        text[:, text_axis] = torch.arange(text_tokens)
    ids = torch.cat([text, image.reshape(-1, axes)])
    angles = torch.cat(
        [
            ids[:, i, None].double() / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            for i, d in enumerate(axes_dim)
        ],
        -1,
    )
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def test_layer_streams():
    assert layer_stream("double_blocks.3.img_attn.qkv") == "image"
    assert layer_stream("double_blocks.3.img_mlp.2") == "image"
    assert layer_stream("double_blocks.0.txt_attn.proj") == "text"
    assert layer_stream("single_blocks.10.linear1") == "joint"
    assert layer_stream("double_blocks.3.img_mod.lin") == "modulation:image"
    assert layer_stream("single_blocks.1.modulation.lin") == "modulation:joint"
    assert layer_stream("time_in.in_layer") == "vector"


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_captured_qk_equal_the_blocks_own(forge, tiny_unet, cfg_scale):
    model = flux_model(tiny_unet)
    block_index = 1
    inputs = []
    recorder = tiny_unet.clone()
    original = recorder.get_model_object(f"diffusion_model.double_blocks.{block_index}.forward")

    def record(*args, **kwargs):  # classic passes img, txt, vec, pe by position; Neo by name, with more
        given = dict(zip(("img", "txt", "vec", "pe"), args, strict=False)) | kwargs
        inputs.append((given["img"].clone(), given["txt"].clone(), given["vec"].clone()))
        return original(*args, **kwargs)

    recorder.add_object_patch(f"diffusion_model.double_blocks.{block_index}.forward", record)
    words = (((1, 2), (5,)), ((0,), (3, 4)))  # two images
    job = make_job(words=words, capture_step=1, mask_config=MaskConfig(superpixel_vote=False))
    unet = patch_unet(recorder, job, {}, capture_block=block_index)
    forge.sample(unet, steps=3, batch=2, cfg_scale=cfg_scale, latent_hw=(10, 12))

    assert len(job.stored) == 1 and job.masks is not None and job.masks.shape == (2, 2, 5, 6)
    q, k = job.stored[0]
    calls_per_step = 1  # Forge batches [uncond, cond] into one call when the text lengths agree
    img, txt, vec = inputs[1 * calls_per_step]  # the capture call: step 1
    cond = slice(2, 4) if cfg_scale > 1 else slice(0, 2)
    with torch.no_grad():
        mq, mk = manual_qk(model.double_blocks[block_index], img[cond], txt[cond], vec[cond], heads=2)
    axes = forge.TINY_CONFIG["axes_dim"]
    torch.testing.assert_close(q, manual_rope(mq, (5, 6), TEXT_TOKENS, axes), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, manual_rope(mk, (5, 6), TEXT_TOKENS, axes), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "sampler", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpm_2", "sample_euler_ancestral"]
)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_capture_step_counts_sampler_steps(forge, tiny_unet, sampler, cfg_scale):
    sigmas = forge.simple_sigmas(tiny_unet, 5)
    job = make_job(capture_step=2, schedule=sigmas, mask_config=MaskConfig(superpixel_vote=False))
    unet = patch_unet(tiny_unet, job, {}, capture_block=0)
    forge.sample(unet, steps=5, cfg_scale=cfg_scale, sampler=sampler)
    assert len(job.stored) == 1, "exactly one capture per run"
    assert job.capture_sigmas[0] == pytest.approx(float(sigmas[2]), rel=1e-5)
    assert job.masks is not None


def test_no_patch_remains_after_a_job(forge, tiny_unet):
    import backend.nn.flux as flux

    fresh = forge.sample(tiny_unet, steps=3, seed=3)
    job = make_job(capture_step=1)
    forge.sample(patch_unet(tiny_unet, job, {}, capture_block=2), steps=3, seed=3)
    assert job.masks is not None
    after = forge.sample(tiny_unet, steps=3, seed=3)  # the next job, FreeFuse off
    assert torch.equal(after, fresh)
    model = flux_model(tiny_unet)
    assert all(type(b).forward is getattr(b.forward, "__func__", None) for b in model.double_blocks)
    assert flux.attention.__module__ == "backend.nn.flux" and flux.attention.__name__ == "attention"


def test_no_patch_remains_after_an_exception_mid_capture(forge, tiny_unet):
    import backend.nn.flux as flux

    fresh = forge.sample(tiny_unet, steps=3, seed=4)
    job = make_job(capture_step=1)
    saboteur = tiny_unet.clone()
    proj = saboteur.get_model_object("diffusion_model.double_blocks.2.img_attn.proj.forward")

    def explode_during_capture(x):
        if job.capturing:
            raise RuntimeError("interrupted")
        return proj(x)

    saboteur.add_object_patch("diffusion_model.double_blocks.2.img_attn.proj.forward", explode_during_capture)
    with pytest.raises(RuntimeError, match="interrupted"):
        forge.sample(patch_unet(saboteur, job, {}, capture_block=2), steps=3, seed=4)
    assert flux.attention.__name__ == "attention"  # the swap inside the capture block was undone
    assert job._call is None
    assert torch.equal(forge.sample(tiny_unet, steps=3, seed=4), fresh)


def test_mask_extraction_failure_ends_in_an_image(forge, tiny_unet, caplog):
    def broken_decode(latents):
        raise RuntimeError("VAE exploded")

    plan = JobPlan(word_positions=WORDS, text_length=TEXT_TOKENS, capture_step=1)
    job = FreeFuseJob(plan, broken_decode)
    out = forge.sample(patch_unet(tiny_unet, job, {}, capture_block=0), steps=3)
    assert torch.isfinite(out).all()
    assert job.masks is None and "VAE exploded" in job.failure
    assert sum("VAE exploded" in r.getMessage() for r in caplog.records) == 1


def test_not_flux_is_refused(forge):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="^unet:"):
        patch_unet(SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))), None, {}, 0)


def test_capture_block_out_of_range_is_refused(forge, tiny_unet):
    with pytest.raises(ValueError, match="^capture_block:"):
        patch_unet(tiny_unet, make_job(), {}, capture_block=3)


def test_a_second_job_does_not_chain_the_first_jobs_patches(forge, tiny_unet):
    """Forge leaves a sampled patcher's object patches in place until another patcher loads: the next FreeFuse
    job must wrap the model's own methods, not the previous job's patches."""
    first = make_job(capture_step=1)
    forge.sample(patch_unet(tiny_unet, first, {}, capture_block=1), steps=3)
    second = make_job(capture_step=1)
    forge.sample(patch_unet(tiny_unet, second, {}, capture_block=1), steps=3)
    live = flux_model(tiny_unet).double_blocks[1].forward  # still patched: the second patcher is loaded
    assert isinstance(live, CaptureBlock) and live.job is second
    assert not isinstance(live.original_forward, CaptureBlock)
    assert first.capture_count == 1 and second.capture_count == 1
