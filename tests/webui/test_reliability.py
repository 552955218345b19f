"""Reliability cases through the real webui: odd and wide sizes, BREAK, emphasis, non-ASCII words, prompts longer
than 256 T5 tokens, a prompt per image of a batch, LoRA files that cannot be used, faults injected inside FreeFuse,
Interrupt and Skip mid-sampling."""

from __future__ import annotations

import json
import random
import struct
import threading
import time

import pytest
from test_freefuse_api import PROMPT, freefuse, infotext_coverage, tagged


@pytest.mark.parametrize(("width", "height"), [(72, 56), (64, 64), (192, 64), (40, 88)], ids=str)
def test_odd_and_wide_sizes_get_masks(webui, width, height):
    result = webui.txt2img(
        tagged(webui), steps=6, width=width, height=height, alwayson_scripts=freefuse(webui, show_masks=True)
    )
    size = webui.image_size(width, height)
    assert [(im.width, im.height) for im in result.images] == [size] * 2  # the image and its overlay
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a (cat:1.3) and a ((dog)) in a [garden]",
        "ein Foto von einer Katze, a cat, und einem Hund, a dog, am Café",
    ],
    ids=["emphasis", "non-ascii"],
)
def test_prompt_syntax_keeps_the_words_found(webui, prompt):
    result = webui.txt2img(tagged(webui, prompt), steps=6, alwayson_scripts=freefuse(webui))
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext


def test_words_after_break_are_named(webui):
    """Forge's FLUX conditions on the text before the first BREAK only: words after it cannot be found by the model."""
    result = webui.txt2img(tagged(webui, "a photo of a cat BREAK and a dog"), steps=6, alwayson_scripts=freefuse(webui))
    assert "(dog) come only after BREAK" in result.infotext, result.infotext
    assert len(result.images) == 1


def test_interrupt_mid_sampling_leaves_nothing_behind(webui):
    """Interrupt (the UI's button, the API's /interrupt) during a FreeFuse job: the job ends, and the next job
    without FreeFuse is bit-identical to one made before."""
    before = webui.txt2img(tagged(webui), steps=4)
    long_job = {}

    def run():
        long_job["result"] = webui.txt2img(tagged(webui), steps=400, alwayson_scripts=freefuse(webui))

    made = webui.log().count("FreeFuse: masks made")
    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while webui.log().count("FreeFuse: masks made") == made and time.monotonic() < deadline:
        time.sleep(0.05)  # interrupt once this job's masks exist, i.e. with every patch in use
    assert worker.is_alive(), "the long job ended before it could be interrupted"
    webui.post("/sdapi/v1/interrupt", {})
    interrupted = time.monotonic()
    worker.join(timeout=120)
    assert not worker.is_alive() and "result" in long_job
    assert time.monotonic() - interrupted < 5, "the job did not stop at the interrupt"
    after = webui.txt2img(tagged(webui), steps=4)
    assert after.images[0].pixels == before.images[0].pixels


def test_skip_mid_sampling_goes_on_with_the_next_batch_and_leaves_nothing_behind(webui):
    """Skip (the UI's button, the API's /skip) while batch 1 of 2 samples with its masks: Forge ends that batch at
    the step it reached and samples batch 2, for which FreeFuse makes masks again; nothing is reported, and the next
    job without FreeFuse is bit-identical to one made before."""
    steps = 200
    before = webui.txt2img(tagged(webui), steps=4)
    made = webui.log().count("FreeFuse: masks made")
    job = {}

    def run():
        job["result"] = webui.txt2img(tagged(webui), steps=steps, n_iter=2, alwayson_scripts=freefuse(webui))

    worker = threading.Thread(target=run)
    started = time.monotonic()
    worker.start()
    wait_for_log(webui, "FreeFuse: masks made", made + 1)  # batch 1 has its masks: every patch is in use
    first_masks = time.monotonic() - started
    progress = webui.get("/sdapi/v1/progress?skip_current_image=true")["state"]
    assert worker.is_alive() and progress["job_no"] == 0, progress
    webui.post("/sdapi/v1/skip", {})
    skipped = time.monotonic()
    wait_for_log(webui, "FreeFuse: masks made", made + 2)  # batch 2 started and made its own masks
    # batch 1 had most of its 200 steps left: had the skip not ended it, batch 2's masks would come much later
    assert time.monotonic() - skipped < 2 * first_masks + 5, (first_masks, time.monotonic() - skipped)
    worker.join(timeout=300)
    assert not worker.is_alive() and "result" in job
    result = job["result"]
    assert len(result.images) == 2
    assert "FreeFuse warnings" not in result.infotext, result.infotext
    assert result.images[0].pixels != result.images[1].pixels
    after = webui.txt2img(tagged(webui), steps=4)
    assert after.images[0].pixels == before.images[0].pixels


def wait_for_log(webui, text: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while webui.log().count(text) < count:
        assert time.monotonic() < deadline, f"no {count}th {text!r} in the log\n{webui.log_tail()}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- faults injected inside FreeFuse


@pytest.mark.parametrize(
    ("stage", "reported"),
    [
        ("capture", "capturing the attention failed: RuntimeError: injected fault: capture"),
        ("slic", "mask extraction failed: RuntimeError: injected fault: slic"),
        ("masks", "applying the masks failed: RuntimeError: injected fault: masks"),
    ],
)
def test_a_fault_inside_freefuse_still_makes_the_image(webui, stage, reported):
    """An exception raised inside FreeFuse during sampling (webui_hook/sitecustomize.py injects it in the server):
    in the attention capture, in SLIC, or in the masked LoRA product once the masks exist. The image is made,
    without masks (no overlay, no coverage); the failure is logged once and named in the infotext; the same job
    right after is exactly the one made before the fault."""
    job = dict(steps=6, alwayson_scripts=freefuse(webui, show_masks=True))
    reference = webui.txt2img(tagged(webui), **job)
    assert len(reference.images) == 2  # the image and its overlay
    log_start = len(webui.log())
    with webui.fault(stage):
        failed = webui.txt2img(tagged(webui), **job)
    assert len(failed.images) == 1 and (failed.images[0].width, failed.images[0].height) == (64, 64)
    assert reported in failed.infotext and "FreeFuse warnings" in failed.infotext, failed.infotext
    assert "FreeFuse coverage" not in failed.infotext
    log = webui.log()[log_start:]
    assert log.count(f"injected fault: {stage}") == 1, log
    assert f"FreeFuse: {reported}; the rest of this image is made without masks" in log
    assert "Traceback" not in log
    again = webui.txt2img(tagged(webui), **job)
    assert again.infotext == reference.infotext
    assert [im.pixels for im in again.images] == [im.pixels for im in reference.images]


@pytest.mark.parametrize(
    ("stage", "reported"),
    [
        ("host", "keeps its LoRAs in a way FreeFuse does not know (neither Forge Neo nor classic Forge)"),
        ("start", "FreeFuse could not start in this Forge (AttributeError: 'Flux' object has no attribute"),
    ],
)
def test_a_host_freefuse_does_not_know_gets_one_warning_and_the_plain_image(webui, stage, reported):
    """A Forge whose adapter fails (injected in the server: no adapter owns the patcher, or the host lacks an
    attribute the adapter uses): one warning, in the console and the infotext; the image is exactly the one made
    without FreeFuse, and the infotext records no FreeFuse settings."""
    plain = webui.txt2img(tagged(webui), steps=6)
    log_start = len(webui.log())
    with webui.fault(stage):
        result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, show_masks=True))
    assert [im.pixels for im in result.images] == [plain.images[0].pixels]
    assert reported in result.infotext, result.infotext
    assert 'FreeFuse: "' not in result.infotext and "FreeFuse version" not in result.infotext
    assert "FreeFuse coverage" not in result.infotext
    log = webui.log()[log_start:]
    assert log.count(reported) == 1, log


# ------------------------------------------------------------------------------------ LoRA files that fail


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """A .safetensors file written with the standard library: {name: (shape, [float32 values])}."""
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def lora_tensors(module: str, in_features: int, out_features: int, seed: int, rank: int = 4) -> dict:
    """A kohya LoRA of one layer (e.g. "double_blocks_0_img_attn_qkv"), small random values."""
    rng = random.Random(seed)
    values = lambda n, scale: [rng.gauss(0, scale) for _ in range(n)]  # noqa: E731
    return {
        f"lora_unet_{module}.lora_down.weight": ((rank, in_features), values(rank * in_features, 0.1)),
        f"lora_unet_{module}.lora_up.weight": ((out_features, rank), values(out_features * rank, 0.05)),
        f"lora_unet_{module}.alpha": ((), [float(rank)]),
    }


@pytest.fixture
def problem_loras(webui):
    """LoRA files FreeFuse cannot use, and one usable under two names, in the webui's Lora folder for one test
    (Forge's /refresh-loras lists them, and lists them no more afterwards). Written for each test: Forge's loader
    renames a file it cannot read to <name>.safetensors.corrupted."""
    folder = webui.data_dir / "models" / "Lora"
    hidden = webui.manifest["transformer"]["hidden_size"]
    files = {
        "ff_garbage": lambda path: path.write_bytes(b"not a safetensors file at all " * 8),
        "ff_not_a_lora": lambda path: write_safetensors(path, {"model.conv.weight": ((2, 2), [1.0, 2.0, 3.0, 4.0])}),
        "ff_sd15_lora": lambda path: write_safetensors(  # an SD1.5 LoRA: its keys name no layer of FLUX
            path, lora_tensors("down_blocks_0_attentions_0_proj_in", 320, 320, seed=5)
        ),
        "ff_twin": lambda path: write_safetensors(  # Forge also lists it under its ss_output_name
            path,
            lora_tensors("double_blocks_0_img_attn_qkv", hidden, 3 * hidden, seed=6),
            metadata={"ss_output_name": "ff_twin_alias", "modelspec.architecture": "flux-1-dev/lora"},
        ),
    }
    paths = [folder / f"{name}.safetensors" for name in files]
    for path, write in zip(paths, files.values(), strict=True):
        write(path)
    webui.post("/sdapi/v1/refresh-loras", {})
    names = {entry["name"] for entry in webui.get("/sdapi/v1/loras")}
    assert set(files) <= names, names
    yield
    for path in paths:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".corrupted").unlink(missing_ok=True)
    webui.post("/sdapi/v1/refresh-loras", {})


def unreadable(webui) -> str:
    """How the host's safetensors loader says a file is not one (Neo adds the path after this)."""
    return "Model " if webui.neo else "Error while deserializing header: HeaderTooLarge"


@pytest.mark.parametrize(
    ("extra", "warning"),
    [
        (
            [{"lora": "ff_garbage", "words": "garden"}],
            "LoRA ff_garbage could not be read: ValueError: {unreadable}",
        ),
        (
            [{"lora": "ff_not_a_lora", "words": "garden"}],
            "LoRA ff_not_a_lora changes no layer of this model (none of its 1 keys, e.g. model.conv.weight, "
            "matches a layer): not a LoRA for this model",
        ),
        (
            [{"lora": "ff_sd15_lora", "words": "garden"}],
            "LoRA ff_sd15_lora changes no layer of this model (none of its 3 keys, e.g. "
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha, matches a layer): not a LoRA for this model",
        ),
        ([{"lora": "A", "words": "garden"}], "LoRA A is bound twice (words 'cat' and 'garden'): using the first"),
        (
            [{"lora": "ff_twin", "words": "garden"}, {"lora": "ff_twin_alias", "words": "photo"}],
            "LoRA ff_twin_alias is the same file as ff_twin (ff_twin.safetensors): using the first binding only",
        ),
    ],
    ids=["unreadable-file", "not-a-lora", "lora-of-another-model", "bound-twice", "same-file-two-names"],
)
def test_a_lora_that_cannot_be_used_is_named_and_the_others_get_masks(webui, problem_loras, extra, warning):
    a, b = webui.lora_names[:2]
    names = {"A": a, "B": b}
    subjects = [{"lora": a, "words": "cat"}, {"lora": b, "words": "dog"}]
    subjects += [{**row, "lora": names.get(row["lora"], row["lora"])} for row in extra]
    warning = warning.replace("LoRA A ", f"LoRA {a} ").replace("{unreadable}", unreadable(webui))
    log_start = len(webui.log())
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, subjects=subjects))
    assert len(result.images) == 1
    assert warning in result.infotext, result.infotext
    assert webui.log()[log_start:].count(warning) == 1
    usable = {a, b} | ({"ff_twin"} if "ff_twin" in str(extra) else set())
    assert set(infotext_coverage(result.infotext)) == usable


@pytest.mark.parametrize(
    ("subjects", "warnings"),
    [
        ([{"lora": "A", "words": "cat"}], ["1 usable subject(s): FreeFuse needs at least 2; the LoRAs act as usual"]),
        (
            [{"lora": "A", "words": "cat"}, {"lora": "ff_garbage", "words": "dog"}],
            [
                "LoRA ff_garbage could not be read: ValueError: {unreadable}",
                "1 usable subject(s): FreeFuse needs at least 2",
            ],
        ),
    ],
    ids=["one-subject", "one-usable-of-two"],
)
def test_fewer_than_two_usable_subjects_make_the_image_without_freefuse(webui, problem_loras, subjects, warnings):
    """FreeFuse steps aside, says so, and the image is exactly the one made without FreeFuse."""
    a = webui.lora_names[0]
    subjects = [{**row, "lora": a if row["lora"] == "A" else row["lora"]} for row in subjects]
    plain = webui.txt2img(tagged(webui), steps=6)
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, subjects=subjects))
    for warning in warnings:
        warning = warning.replace("{unreadable}", unreadable(webui))
        assert warning in result.infotext, result.infotext
    assert "FreeFuse coverage" not in result.infotext
    assert result.images[0].pixels == plain.images[0].pixels


# ------------------------------------------------------------------------------------------ prompt shapes


def test_a_prompt_longer_than_256_t5_tokens_keeps_words_on_both_sides_of_256(webui):
    """Forge's T5 engine pads a prompt to 256 tokens but never cuts a longer one (no BREAK): this prompt is 417 T5
    tokens, "cat" token 6 and "dog" token 412 (counted with Forge's FLUX tokenizer_2). Both are found, masks are
    made, nothing is reported."""
    filler = " ".join(["a red house"] * 100)
    prompt = tagged(webui, f"a photo of a cat, {filler}, and a dog in a garden")
    result = webui.txt2img(prompt, steps=6, alwayson_scripts=freefuse(webui, show_masks=True))
    assert len(result.images) == 2
    assert "FreeFuse warnings" not in result.infotext, result.infotext
    coverage = infotext_coverage(result.infotext)
    assert sum(sum(values) for values in coverage.values()) == pytest.approx(100, abs=0.5)


@pytest.mark.parametrize("layout", ["batch_size", "n_iter"])
def test_a_prompt_per_image_finds_each_images_words(webui, layout):
    """Two images, image 1 "cat and a dog", image 2 "dog and a cat" (the test extension in webui_extension/ sets
    p.all_prompts, as Dynamic Prompts does), in one batch of 2 or in 2 batches: FreeFuse reads each image's words at
    that image's token positions, so each image's masks are those of the same image made alone (its own prompt and
    seed)."""
    prompts = [f"{PROMPT}", "a photo of a dog and a cat in a garden"]
    result = webui.txt2img(
        tagged(webui, "a photo of a {cat and a dog|dog and a cat} in a garden"),
        steps=6,
        alwayson_scripts=freefuse(webui, show_masks=True),
        **{layout: 2},
    )
    infotexts = result.info["infotexts"]
    assert [text.splitlines()[0] for text in infotexts[:2]] == [tagged(webui, p) for p in prompts]
    assert len(result.images) == 4  # two images, two overlays
    assert all("FreeFuse warnings" not in text for text in infotexts), infotexts
    alone = [
        infotext_coverage(
            webui.txt2img(tagged(webui, prompt), steps=6, seed=1234 + i, alwayson_scripts=freefuse(webui)).infotext
        )
        for i, prompt in enumerate(prompts)
    ]
    for i in range(2):
        coverage = infotext_coverage(infotexts[i])  # a batch's images, each in its own order
        index = i if layout == "batch_size" else 0
        assert {lora: values[index] for lora, values in coverage.items()} == {
            lora: values[0] for lora, values in alone[i].items()
        }, (i, coverage, alone)
    assert result.images[2].pixels != result.images[3].pixels  # the two overlays: the masks differ per image
