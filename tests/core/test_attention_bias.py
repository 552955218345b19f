"""The phase-2 attention bias against a naive loop over token pairs (the authors' later code's construction)."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse.core.attention_bias import joint_attention_bias

pytestmark = pytest.mark.core


def naive_bias(image_masks, words, n_text, negative, positive, extra=0):
    """One image: image_masks (N, L); words[l] = subject l's text positions (each token one subject's at most)."""
    n_image, n_subjects = image_masks.shape
    owner = {j: l for l, positions in enumerate(words) for j in positions}
    length = n_text + n_image + extra
    bias = torch.zeros(length, length)
    for l in range(n_subjects):
        for i in range(n_image):
            m = float(image_masks[i, l])
            for j in range(n_text):
                if owner.get(j) == l:
                    bias[n_text + i, j] += positive * m  # own words, from its region
                    bias[j, n_text + i] += positive * m - negative * (1 - m)  # own words, to its region or elsewhere
                elif j in owner:
                    bias[n_text + i, j] -= negative * m  # another subject's words, from this region
    return bias


def word_masks(words, n_text, n_subjects):
    masks = torch.zeros(n_text, n_subjects)
    for l, positions in enumerate(words):
        masks[list(positions), l] = 1.0
    return masks


@pytest.mark.parametrize("soft", [False, True])
def test_bias_equals_the_naive_construction(soft):
    torch.manual_seed(0)
    n_text, n_image, words = 7, 12, [(1, 2), (4,), (6,)]
    if soft:
        image = torch.softmax(torch.randn(n_image, 3), dim=1) * 0.9  # soft, with some unowned share
    else:
        image = torch.nn.functional.one_hot(torch.randint(0, 3, (n_image,)), 3).float()
        image[0] = 0  # a background token
    got = joint_attention_bias(image[None], word_masks(words, n_text, 3)[None], negative=5.0, extra_tokens=3)
    expected = naive_bias(image, words, n_text, negative=5.0, positive=1.0, extra=3)
    assert got.shape == (1, 1, n_text + n_image + 3, n_text + n_image + 3)
    torch.testing.assert_close(got[0, 0], expected)


def test_blocks_that_get_no_bias():
    torch.manual_seed(1)
    image = torch.nn.functional.one_hot(torch.randint(0, 2, (9,)), 2).float()[None]
    words = word_masks([(0,), (2,)], 4, 2)[None]
    bias = joint_attention_bias(image, words, negative=5.0, positive=2.0, extra_tokens=2)[0, 0]
    assert bias[:4, :4].eq(0).all() and bias[4:13, 4:13].eq(0).all()  # text-text, image-image
    assert bias[13:].eq(0).all() and bias[:, 13:].eq(0).all()  # reference tokens
    assert bias[[1, 3]].eq(0).all() and bias[:, [1, 3]].eq(0).all()  # tokens that are no subject's word
    owner = image[0].argmax(dim=1)
    assert bias[4:13, 0].tolist() == [2.0 if o == 0 else -5.0 for o in owner]  # subject 0's word, seen from each token
    assert bias[0, 4:13].tolist() == [2.0 if o == 0 else -5.0 for o in owner]  # subject 0's word, to each token


def test_an_unconditional_row_and_zero_strength_give_no_bias():
    image = torch.ones(2, 5, 2) / 2
    words = torch.zeros(2, 3, 2)
    words[1, 0, 0] = words[1, 2, 1] = 1.0  # row 0: the unconditional prompt, no subject words
    bias = joint_attention_bias(image, words, negative=5.0)
    assert bias[0].eq(0).all() and bias[1].ne(0).any()
    assert joint_attention_bias(image, torch.ones(2, 3, 2), negative=0.0).eq(0).all()


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="masks: expected image"):
        joint_attention_bias(torch.ones(5, 2), torch.ones(1, 3, 2), negative=5.0)
    with pytest.raises(ValueError, match="differ in batch or subjects"):
        joint_attention_bias(torch.ones(1, 5, 2), torch.ones(1, 3, 3), negative=5.0)
    with pytest.raises(ValueError, match="strengths >= 0"):
        joint_attention_bias(torch.ones(1, 5, 2), torch.ones(1, 3, 2), negative=-1.0)


# The job's bias for one model call (lib_freefuse.forge.job knows no host)


def job_with_masks(bias: float, **plan):
    from lib_freefuse.forge.job import FreeFuseJob, JobPlan

    masks = torch.zeros(1, 2, 2, 3)
    masks[0, 0, :, :1] = 1.0  # a 2x3 token grid: subject 0 the left column, subject 1 the rest
    masks[0, 1, :, 1:] = 1.0
    fields = {"word_positions": (((1,), (3,)),), "text_length": 5, "capture_step": 10**6, "initial_masks": masks}
    return FreeFuseJob(JobPlan(**fields, attention_bias=bias, **plan), decode=None), masks


def begin(job, chunks=(1, 0), text_tokens=5):
    x = torch.zeros(len(chunks), 16, 4, 6)  # FLUX latents: 2x2 patches -> the 2x3 grid
    job.begin_call(x, torch.full((len(chunks),), 0.5), list(chunks), text_tokens)


def test_the_job_biases_the_conditional_chunk_only():
    job, masks = job_with_masks(5.0)
    begin(job)
    bias = job.attention_bias(11, torch.float32, torch.device("cpu"))
    assert bias.shape == (2, 1, 11, 11)
    assert bias[0].eq(0).all()  # the unconditional prompt holds no subject words
    image = masks.flatten(2).transpose(1, 2)
    expected = joint_attention_bias(image, word_masks([(1,), (3,)], 5, 2)[None], negative=5.0)
    torch.testing.assert_close(bias[1:], expected)
    assert job.attention_bias(11, torch.float32, torch.device("cpu")) is bias  # made once per call


def test_the_job_gives_no_bias_when_off_or_before_the_masks():
    off, _ = job_with_masks(0.0)
    begin(off)
    assert off.attention_bias(11, torch.float32, torch.device("cpu")) is None
    early, _ = job_with_masks(5.0)
    early.masks = None
    begin(early)
    assert early.attention_bias(11, torch.float32, torch.device("cpu")) is None


def test_a_sequence_of_another_length_is_refused():
    job, _ = job_with_masks(5.0)
    begin(job)
    with pytest.raises(ValueError, match="joint attention over 12 tokens, expected 5 text \\+ 6 image"):
        job.attention_bias(12, torch.float32, torch.device("cpu"))


def test_a_family_without_it_warns_for_a_chosen_bias_and_runs_without_it():
    from lib_freefuse.args import FreeFuseArgs
    from lib_freefuse.families import FLUX1, SDXL_FAMILY
    from lib_freefuse.forge.processing import RunState, _attention_bias

    args = FreeFuseArgs(attention_bias=2.0)
    state = RunState()
    assert _attention_bias(args, FLUX1, state) == 2.0 and not state.warnings
    assert _attention_bias(args, SDXL_FAMILY, state) == 0.0
    assert state.warnings == ["keeping words to their regions is not available for SDXL models: made without it"]


def test_the_default_bias_is_on_where_the_family_can_take_it_and_silently_off_elsewhere():
    from lib_freefuse.args import FreeFuseArgs
    from lib_freefuse.families import FLUX1, SDXL_FAMILY
    from lib_freefuse.forge.processing import RunState, _attention_bias

    state = RunState()
    assert FreeFuseArgs().attention_bias == 5.0
    assert _attention_bias(FreeFuseArgs(), FLUX1, state) == 5.0
    assert _attention_bias(FreeFuseArgs(), SDXL_FAMILY, state) == 0.0
    assert _attention_bias(FreeFuseArgs(attention_bias=0.0), FLUX1, state) == 0.0
    assert not state.warnings
