"""Two subject LoRAs through the whole FreeFuse path (job, host patches, Forge's sampling), against Forge's merge."""

from __future__ import annotations

import forge_env
import pytest
import torch

from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.forge.lora_layers import subject_deltas

H, MLP = 128, 512
LATENT = (12, 16)  # a 6x8 token grid
GRID = (6, 8)


def lora_sd(seed: int, image_only: bool) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA; image_only keeps it to image-stream layers and the image modulation."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "double_blocks_0_img_attn_qkv": (3 * H, H),
        "double_blocks_1_img_mlp_0": (MLP, H),
        "double_blocks_2_img_attn_proj": (H, H),
        "double_blocks_1_img_mod_lin": (6 * H, H),
    }
    if not image_only:
        shapes |= {
            "double_blocks_0_txt_attn_qkv": (3 * H, H),
            "single_blocks_0_linear1": (3 * H + MLP, H),
            "single_blocks_1_linear2": (H, H + MLP),
            "single_blocks_1_modulation_lin": (3 * H, H),
            "double_blocks_2_txt_mod_lin": (6 * H, H),
        }
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = 0.3 * torch.randn(out_f, 4, generator=g)
        sd[f"lora_unet_{name}.lora_down.weight"] = 0.3 * torch.randn(4, in_f, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    return sd


def with_loras(unet, sds: dict[str, dict], strength: float = 0.9):
    """What sd_forge_lora does for the prompt's tags: the host's key map, load_lora, add_patches, one file each."""
    merged, _, unmatched = forge_env.with_loras(unet, sds, strength)
    assert not unmatched
    return merged


def freefuse_unet(merged_unet, names, masks: torch.Tensor | None, modulation="per_token", **plan_fields):
    """A FreeFuse clone of a patcher with the subject LoRAs merged: they come out of the merge and are applied
    masked, with the given (B_img, L, h, w) masks from the first step."""
    params = dict(merged_unet.model.named_parameters())
    host = forge_env.host_adapter()
    deltas: dict[str, list] = {}
    merged = []
    for index, name in enumerate(names):
        patches = forge_env.merged_patches(merged_unet, str(forge_env.lora_dir() / name))
        merged.append(patches)
        found, _ = subject_deltas(patches, lambda k: params[k], host.merge)
        for delta in found:
            deltas.setdefault(delta.module, []).append((index, delta))
    fields = {
        "word_positions": (((),) * len(names),),  # no words: text tokens get every LoRA
        "text_length": 8,
        "capture_step": 10**6,
        "modulation": modulation,
        "initial_masks": masks,
        **plan_fields,
    }
    if masks is not None:
        fields["word_positions"] = tuple(((),) * len(names) for _ in range(masks.shape[0]))
    job = FreeFuseJob(JobPlan(**fields), decode=None)
    return patch_unet(merged_unet, job, deltas, capture_block=0, merged=merged), job


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("modulation", ["per_token", "global"])
def test_all_ones_masks_equal_forges_merged_loras(forge, tiny_unet, cfg_scale, modulation):
    sds = {"a.safetensors": lora_sd(1, image_only=False), "b.safetensors": lora_sd(2, image_only=False)}
    merged = with_loras(tiny_unet, sds)
    expected = forge.sample(merged, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT)
    unet, job = freefuse_unet(merged, list(sds), torch.ones(1, 2, *GRID), modulation)
    got = forge.sample(unet, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    plain = forge.sample(tiny_unet, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT)
    assert (expected - plain).abs().max() > 1e-2  # the LoRAs do change the image


def test_zero_masks_equal_no_lora(forge, tiny_unet):
    sds = {"a.safetensors": lora_sd(1, image_only=True), "b.safetensors": lora_sd(2, image_only=True)}
    merged = with_loras(tiny_unet, sds)
    unet, _ = freefuse_unet(merged, list(sds), torch.zeros(1, 2, *GRID))
    got = forge.sample(unet, steps=3, latent_hw=LATENT)
    torch.testing.assert_close(got, forge.sample(tiny_unet, steps=3, latent_hw=LATENT), atol=2e-5, rtol=1e-5)


def test_batch_of_two_with_different_masks(forge, tiny_unet):
    """Image 0 wholly subject A, image 1 wholly subject B: each equals a run with only its own LoRA merged."""
    sds = {"a.safetensors": lora_sd(1, image_only=True), "b.safetensors": lora_sd(2, image_only=True)}
    masks = torch.zeros(2, 2, *GRID)
    masks[0, 0] = 1
    masks[1, 1] = 1
    unet, _ = freefuse_unet(with_loras(tiny_unet, sds), list(sds), masks)
    got = forge.sample(unet, steps=3, batch=2, latent_hw=LATENT)
    only_a = forge.sample(
        with_loras(tiny_unet, {"a.safetensors": sds["a.safetensors"]}), steps=3, batch=2, latent_hw=LATENT
    )
    only_b = forge.sample(
        with_loras(tiny_unet, {"b.safetensors": sds["b.safetensors"]}), steps=3, batch=2, latent_hw=LATENT
    )
    torch.testing.assert_close(got[0], only_a[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], only_b[1], atol=2e-5, rtol=1e-5)


def test_per_token_modulation_follows_the_masks(forge, tiny_unet):
    """Left half subject A, right half subject B: the image-modulation delta differs between the halves, which a
    global delta could not do; with per-token off ("off"), no subject modulation acts at all."""
    sds = {"a.safetensors": lora_sd(1, image_only=True), "b.safetensors": lora_sd(2, image_only=True)}
    masks = torch.zeros(1, 2, *GRID)
    masks[0, 0, :, :4] = 1
    masks[0, 1, :, 4:] = 1
    merged = with_loras(tiny_unet, sds)
    per_token = forge.sample(freefuse_unet(merged, list(sds), masks, "per_token")[0], steps=2, latent_hw=LATENT)
    global_ = forge.sample(freefuse_unet(merged, list(sds), masks, "global")[0], steps=2, latent_hw=LATENT)
    off = forge.sample(freefuse_unet(merged, list(sds), masks, "off")[0], steps=2, latent_hw=LATENT)
    assert not torch.allclose(per_token, global_, atol=1e-4)
    assert not torch.allclose(per_token, off, atol=1e-4)


def test_restart_samples_again_from_the_first_step_with_the_masks(forge, tiny_unet):
    """With restart, the masks made at the capture step are used from step 0 of a second run: the result is the
    run that had those masks from the start, and differs from the run without restart."""
    from lib_freefuse.core import MaskConfig

    sds = {"a.safetensors": lora_sd(1, image_only=True), "b.safetensors": lora_sd(2, image_only=True)}
    merged = with_loras(tiny_unet, sds)
    words = {"word_positions": (((1, 2), (5,)),), "capture_step": 1, "mask_config": MaskConfig(superpixel_vote=False)}
    unet, job = freefuse_unet(merged, list(sds), None, restart=True, **words)
    runs = []

    def sample():
        runs.append(1)
        return forge.sample(unet, steps=4, seed=5, latent_hw=LATENT)

    restarted = job.run(sample)
    assert len(runs) == 2 and job.capture_count == 1 and job.masks is not None
    assert 0 < job.masks[0, 0].mean() < 1  # the tiny model's masks split the image
    from_start, _ = freefuse_unet(merged, list(sds), job.masks)
    torch.testing.assert_close(restarted, forge.sample(from_start, steps=4, seed=5, latent_hw=LATENT))
    plain_unet, plain_job = freefuse_unet(merged, list(sds), None, **words)
    no_restart = forge.sample(plain_unet, steps=4, seed=5, latent_hw=LATENT)
    assert torch.equal(plain_job.masks, job.masks)
    assert not torch.allclose(no_restart, restarted, atol=1e-4)


class FlakyJob(FreeFuseJob):
    """A job whose mask lookups raise from the `after`-th call on: a fault inside the masked layers."""

    def __init__(self, *args, after: int, where: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.after, self.where = 0, after, where

    def masks_for(self, stream, x):
        return self._maybe_fail("layers") or super().masks_for(stream, x)

    def modulation_masks(self, stream):
        return self._maybe_fail("modulation") or super().modulation_masks(stream)

    def _maybe_fail(self, where):
        if where == self.where:
            self.calls += 1
            if self.calls >= self.after:
                raise RuntimeError(f"injected fault in the {where}")
        return None


@pytest.mark.parametrize(("where", "after"), [("layers", 5), ("modulation", 2)])
def test_a_fault_while_applying_masks_still_ends_in_an_image(forge, tiny_unet, caplog, where, after):
    sds = {"a.safetensors": lora_sd(1, image_only=True), "b.safetensors": lora_sd(2, image_only=True)}
    merged = with_loras(tiny_unet, sds)
    fresh = forge.sample(tiny_unet, steps=3, latent_hw=LATENT)
    unet, job = freefuse_unet(merged, list(sds), torch.ones(1, 2, *GRID))
    job.__class__ = FlakyJob  # the same job, its lookups now failing part-way through sampling
    job.calls, job.after, job.where = 0, after, where
    out = forge.sample(unet, steps=3, latent_hw=LATENT)
    assert torch.isfinite(out).all()
    assert job.failure is not None and f"injected fault in the {where}" in job.failure
    assert sum("injected fault" in r.getMessage() for r in caplog.records) == 1  # reported once
    assert torch.equal(forge.sample(tiny_unet, steps=3, latent_hw=LATENT), fresh)  # the next job is unaffected


@pytest.mark.parametrize("text_loras", ["all", "none"])
def test_text_loras_none_with_zero_masks_is_no_lora_at_all(forge, tiny_unet, text_loras):
    """Zero image masks leave the subject LoRAs only on the text tokens ("all", the paper): the image differs from
    no LoRA. With text_loras "none" nothing of them is left: the run equals the model without the LoRAs."""
    sds = {"a.safetensors": lora_sd(1, image_only=False), "b.safetensors": lora_sd(2, image_only=False)}
    unet, job = freefuse_unet(with_loras(tiny_unet, sds), list(sds), torch.zeros(1, 2, *GRID), text_loras=text_loras)
    got = forge.sample(unet, steps=3, latent_hw=LATENT)
    plain = forge.sample(tiny_unet, steps=3, latent_hw=LATENT)
    assert job.failure is None
    if text_loras == "none":
        torch.testing.assert_close(got, plain, atol=2e-5, rtol=1e-5)
    else:
        assert (got - plain).abs().max() > 1e-3


def test_kontext_reference_tokens_get_every_subject_and_stay_out_of_the_masks(forge, tiny_unet):
    """FLUX.1 Kontext in Neo: reference-image tokens follow the generated image's in the image stream. FreeFuse's
    masks cover the generated image only; the reference tokens get every subject LoRA (as a merged run gives them),
    so all-ones masks still equal Neo's merged LoRAs, and the capture reads the generated image's tokens only."""
    if forge.HOST != "neo":
        pytest.skip("classic Forge's FLUX takes no reference image (Kontext is Neo's)")
    from backend.args import dynamic_args

    from lib_freefuse.core import MaskConfig

    sds = {"a.safetensors": lora_sd(1, image_only=False), "b.safetensors": lora_sd(2, image_only=False)}
    merged = with_loras(tiny_unet, sds)
    saved = dynamic_args.ref_latents
    try:
        dynamic_args.ref_latents = []
        without_reference = forge.sample(merged, steps=3, latent_hw=LATENT)
        dynamic_args.ref_latents = [torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(4))]
        expected = forge.sample(merged, steps=3, latent_hw=LATENT)
        assert (expected - without_reference).abs().max() > 1e-3  # the reference image is read
        unet, job = freefuse_unet(merged, list(sds), torch.ones(1, 2, *GRID))
        got = forge.sample(unet, steps=3, latent_hw=LATENT)
        assert job.failure is None
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
        words = {
            "word_positions": (((1, 2), (5,)),),
            "capture_step": 1,
            "mask_config": MaskConfig(superpixel_vote=False),
        }
        unet, job = freefuse_unet(merged, list(sds), None, **words)
        forge.sample(unet, steps=3, latent_hw=LATENT)
        assert job.failure is None and job.capture_count == 1
        assert job.masks is not None and tuple(job.masks.shape) == (1, 2, *GRID)
    finally:
        dynamic_args.ref_latents = saved
