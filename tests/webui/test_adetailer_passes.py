"""ADetailer's face passes over a FreeFuse image, in a real webui with ADetailer's own code: each pass loads only the
LoRA of the subject whose mask covers its region; a region two subjects share keeps both.

ADetailer is not part of this repository: set ADETAILER_DIR to a checkout of it (Bing-su/adetailer for classic
Forge, Haoming02/ADetailer-Neo for Forge Neo), else this module skips. Its server is a second webui (this module's
fixture) with ADetailer linked in, started with --ad-no-huggingface, and two test-only stand-ins from
adetailer_standin/: an `ultralytics` package whose YOLO "detects" the boxes this test writes (ADetailer detects with
any `.pt` file in models/adetailer/; the tiny images have no faces to find), and a log of the LoRAs Forge loads for
each pass (`networks.load_networks`). The images are the toy world's (bench/toyworld: its trained tiny FLUX and its
two character LoRAs, zorb and quil), where the masks follow the two characters; where each subject's mask lies is
read back from FreeFuse's mask overlay.

The same workflow is then driven in the page as a user following README's "With ADetailer" does (headless Chromium,
browser_page.py): bind the two LoRAs, enable ADetailer with the detector, generate and read the warning, add
`freefuse` to ADetailer's script names on the Settings page, generate again and read each pass's LoRA.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from browser_page import FF, MISSING, TAB, Page, drive, forge_assets_blocked, job_defaults
from conftest import PngImage, start_webui

from lib_freefuse.overlay import COLOURS

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "adetailer_standin"
ADETAILER_ENV = "ADETAILER_DIR"
MODEL = "standin_face.pt"
SIZE = 256  # the toy world's images: 16 x 16 tokens of 16 px
TOKEN = 16
ALPHA = 0.45  # lib_freefuse.overlay.mask_overlay's default
FIRST_ROW = 2  # token rows 0-1 hold the overlay's legend: not read
PROMPT = "zorb on the left and quil on the right"  # the toy world's first benchmark prompt
LORAS = ("toy_zorb", "toy_quil")
WORDS = ("zorb", "quil")
# ADetailer's default script names (SCRIPT_DEFAULT in Bing-su's adetailer/args.py and ADetailer-Neo's
# lib_adetailer/args.py): FreeFuse is not among them
ADETAILER_DEFAULT_SCRIPTS = (
    "dynamic_prompting,dynamic_thresholding,lora_block_weight,negpip,wildcard_recursive,wildcards"
)
WARNING = "add freefuse to the script names it applies (Settings > ADetailer)"  # lib_freefuse/forge/adetailer.py


def adetailer_dir() -> tuple[Path | None, str]:
    configured = os.environ.get(ADETAILER_ENV)
    if not configured:
        return None, f"{ADETAILER_ENV} is not set (a checkout of ADetailer: Bing-su/adetailer or ADetailer-Neo)"
    path = Path(configured).expanduser()
    if not any(path.glob("scripts/*adetailer.py")):
        return None, f"{ADETAILER_ENV}={configured} holds no scripts/*adetailer.py"
    return path, ""


@pytest.fixture(scope="module")
def adetailer_webui(tmp_path_factory):
    checkout, why = adetailer_dir()
    if checkout is None:
        pytest.skip(why)
    files = tmp_path_factory.mktemp("adetailer-test")
    detections, loads = files / "detections.json", files / "lora-calls.jsonl"

    def prepare(data_dir: Path) -> None:
        (data_dir / "models" / "adetailer").mkdir(parents=True, exist_ok=True)
        (data_dir / "models" / "adetailer" / MODEL).write_bytes(b"stand-in: adetailer_standin/ultralytics")

    name = "adetailer-neo" if "neo" in checkout.name.lower() else "adetailer"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FREEFUSE_TEST_DETECTIONS", str(detections))
        env.setenv("FREEFUSE_TEST_LORA_LOG", str(loads))
        with start_webui(
            tmp_path_factory,
            extensions={name: checkout, "freefuse-test-lora-calls": STANDIN / "extension"},
            flags=("--ad-no-huggingface",),
            python_paths=(STANDIN,),
            prepare=prepare,
            record_timings=False,
        ) as server:
            listed = {s["name"] for s in server.get("/sdapi/v1/script-info") if s["is_alwayson"]}
            if "adetailer" not in listed:
                errors = [line for line in server.log().splitlines() if "Error" in line or "adetailer" in line.lower()]
                pytest.fail(f"ADetailer at {checkout} did not load in this Forge:\n" + "\n".join(errors[-12:]))
            server.detections, server.loads = detections, loads
            yield server


def set_script_names(webui, names: str) -> None:
    webui.post("/sdapi/v1/options", {"ad_script_names": names, "ad_only_selected_scripts": True})


def lora_calls(webui) -> list[list[str]]:
    """The LoRA names Forge loaded for each sampling pass since the log was last cleared, in order."""
    path = webui.loads
    return [json.loads(line)["names"] for line in path.read_text().splitlines()] if path.exists() else []


def job(adetailer: bool) -> dict:
    a, b = LORAS
    subjects = [{"lora": lora, "words": words} for lora, words in zip(LORAS, WORDS, strict=True)]
    scripts = {"FreeFuse": {"args": [{"enabled": True, "subjects": subjects, "capture_block": 2, "show_masks": True}]}}
    if adetailer:
        unit = {"ad_model": MODEL, "ad_denoising_strength": 0.5, "ad_dilate_erode": 0, "ad_mask_blur": 0}
        scripts["ADetailer"] = {"args": [True, False, unit, {"ad_model": "None"}]}
    return dict(
        prompt=f"{PROMPT} <lora:{a}:1> <lora:{b}:1>",
        width=SIZE,
        height=SIZE,
        steps=12,
        seed=1003,  # the masks split the image about evenly (zorb 51%, quil 49%)
        alwayson_scripts=scripts,
        override_settings={"sd_model_checkpoint": "toyworld_flux"},
    )


def passes_line(a: str, b: str) -> str:
    """The infotext's entry for boxes_for's three regions: each one-subject region keeps its LoRA, the shared all."""
    return f'FreeFuse ADetailer: "1: {a} ({a} 100%, {b} 0%); 2: {b} ({a} 0%, {b} 100%); 3: all ({a} 50%, {b} 50%)"'


def owners(image: PngImage, overlay: PngImage) -> dict[tuple[int, int], int]:
    """{(token row, column): subject} for every token of rows FIRST_ROW.. whose pixels all show one subject's colour
    in the overlay (overlay = image * (1 - ALPHA) + colour * ALPHA where the masks cover every pixel)."""
    assert (image.width, image.height) == (overlay.width, overlay.height) == (SIZE, SIZE)
    found = {}
    for row in range(FIRST_ROW, SIZE // TOKEN):
        for column in range(SIZE // TOKEN):
            votes = set()
            for y in range(row * TOKEN, (row + 1) * TOKEN):
                for x in range(column * TOKEN, (column + 1) * TOKEN):
                    at, over = (y * SIZE + x) * image.channels, (y * SIZE + x) * overlay.channels
                    colour = [(overlay.pixels[over + c] - (1 - ALPHA) * image.pixels[at + c]) / ALPHA for c in range(3)]
                    distances = [sum((u - v) ** 2 for u, v in zip(colour, k, strict=True)) for k in COLOURS[:2]]
                    votes.add(min(range(2), key=distances.__getitem__) if min(distances) < 12**2 else None)
            if len(votes) == 1 and None not in votes:
                found[(row, column)] = votes.pop()
    return found


def boxes_for(owner: dict[tuple[int, int], int]) -> list[list[int]]:
    """Three regions: inside a token of subject 0, inside a token of subject 1, and two side-by-side tokens of
    different subjects (half each). Boxes are (x0, y0, x1, y1), both ends inclusive, as ADetailer draws them."""
    inside = []
    for subject in (0, 1):
        row, column = next(cell for cell, s in owner.items() if s == subject)
        inside.append([column * TOKEN + 3, row * TOKEN + 3, column * TOKEN + 12, row * TOKEN + 12])
    pair = next(
        (row, column)
        for (row, column), s in owner.items()
        if owner.get((row, column + 1)) is not None and owner[(row, column + 1)] != s
    )
    row, column = pair
    return [*inside, [column * TOKEN, row * TOKEN, column * TOKEN + 2 * TOKEN - 1, row * TOKEN + TOKEN - 1]]


def test_each_face_pass_loads_only_its_own_subjects_lora(adetailer_webui):
    webui = adetailer_webui
    a, b = LORAS
    first = webui.txt2img(**job(adetailer=False))
    image, overlay = first.images
    owner = owners(image, overlay)
    assert set(owner.values()) == {0, 1}, f"the masks give one subject no clean token: {owner}"
    boxes = boxes_for(owner)
    webui.detections.write_text(json.dumps(boxes))

    set_script_names(webui, "dynamic_prompting,freefuse")
    webui.loads.unlink(missing_ok=True)
    redrawn = webui.txt2img(**job(adetailer=True))
    calls = lora_calls(webui)
    assert owners(*redrawn.images) == owner  # the same masks: the same image before ADetailer
    assert calls == [[a, b], [a], [b], [a, b]], calls  # the image, then ADetailer's three passes
    assert redrawn.images[0].pixels != image.pixels  # ADetailer redrew the regions
    assert passes_line(a, b) in redrawn.infotext, redrawn.infotext
    assert "ADetailer model: standin_face.pt" in redrawn.infotext
    assert "FreeFuse: ADetailer pass 1 over image 1 keeps the LoRAs of" in webui.log()

    set_script_names(webui, "dynamic_prompting")  # ADetailer's default: FreeFuse left out of its passes
    webui.loads.unlink(missing_ok=True)
    merged = webui.txt2img(**job(adetailer=True))
    assert lora_calls(webui) == [[a, b]] * 4
    assert WARNING in merged.infotext, merged.infotext
    assert "FreeFuse ADetailer" not in merged.infotext
    assert merged.images[0].pixels != redrawn.images[0].pixels  # the passes' LoRAs changed what they drew


# ------------------------------------------------------------------------------------------ the same, in the page

AD = f"script_{TAB}_adetailer"  # ADetailer's elem_id prefix (its ui.py's elem_id(); the first tab has no suffix)


@pytest.mark.skipif(bool(MISSING), reason=MISSING)
def test_a_user_redraws_each_face_with_its_own_lora_in_the_page(adetailer_webui, browser, tmp_path):
    """README's "With ADetailer", done in the page: with ADetailer's default script names the job warns on the page
    and every face pass loads both LoRAs; once the user adds freefuse on the Settings page, each pass loads its own."""
    webui = adetailer_webui
    blocked = forge_assets_blocked(webui.url)
    if blocked:
        pytest.fail(f"{blocked} (see test_browser.py's test_fill_generate_see_masks_paste_back)")
    set_script_names(webui, ADETAILER_DEFAULT_SCRIPTS)  # as ADetailer is installed: FreeFuse not in its passes
    webui.detections.unlink(missing_ok=True)
    job_defaults(webui, "toyworld_flux", SIZE)
    try:
        drive(_redraw_faces, browser, tmp_path, webui)
    finally:
        set_script_names(webui, ADETAILER_DEFAULT_SCRIPTS)


def _gallery_pngs(page: Page) -> list[PngImage]:
    """The gallery's images as the page loaded them (the image, then FreeFuse's mask overlay)."""
    pngs = []
    for shown in page.gallery_images():
        with urllib.request.urlopen(shown["src"], timeout=60) as response:
            pngs.append(PngImage.decode(response.read()))
    return pngs


def _redraw_faces(page: Page, webui) -> None:
    a, b = LORAS
    spec = job(adetailer=False)

    # 1. txt2img with the API test's job; FreeFuse: the two rows, Show masks, the toy world's capture block
    page.open_page(webui.url)
    page.mark("page up")
    if webui.neo:  # as a user would: Neo's page opens on the preset of the checkpoint it started with (which one
        # that is among the test's checkpoints depends on the folder's order), and only "flux" shows Distilled CFG
        page.choose("forge_ui_preset", "flux")
    page.choose(f"{TAB}_sampling", "Euler")
    page.choose(f"{TAB}_scheduler", "Simple")
    for key in ("width", "height", "steps", "seed"):
        page.number(f"{TAB}_{key}", spec[key])
    page.number(f"{TAB}_cfg_scale", 1)
    page.number(f"{TAB}_distilled_cfg_scale", 3.5)  # the API's (WebUI.txt2img_payload); Neo's page starts at 3
    page.set_prompt(spec["prompt"])
    page.open_accordion(FF)
    for row, (lora, words) in enumerate(zip(LORAS, WORDS, strict=True)):
        page.type_into(f"#{FF}-words-{row} textarea", words)
        page.choose(f"{FF}-lora-{row}", lora)
    page.tick(f"{FF}-show-masks")
    page.open_accordion(f"{FF}-timing")
    page.number(f"{FF}-capture-block", 2)

    # 2. Generate without ADetailer: the masks in the gallery tell where each subject is; the stand-in detector is
    #    told to find three "faces" there (one in each subject's mask, one across both)
    webui.loads.unlink(missing_ok=True)
    info = page.generate(2, "the image and its mask overlay")
    page.mark("masks")
    assert lora_calls(webui) == [[a, b]], lora_calls(webui)
    assert f'FreeFuse: "{a}: zorb; {b}: quil"' in info and "ADetailer" not in info, info
    owner = owners(*_gallery_pngs(page)[:2])
    assert set(owner.values()) == {0, 1}, f"the masks give one subject no clean token: {owner}"
    webui.detections.write_text(json.dumps(boxes_for(owner)))
    page.shot("masks")

    # 3. ADetailer: open its accordion (= enable), the detector; no dilation or blur (the regions stay the boxes),
    #    denoising 0.5. ADetailer-Neo names the section "Inpaint Parameters", Bing-su's "Inpainting"
    main = f"{AD}_ad_main_accordion"
    page.open_accordion(main)
    assert page.checked(f"#{main}-visible-checkbox"), "ADetailer's accordion is open but not enabled"
    page.choose(f"{AD}_ad_model", MODEL)
    page.open_section(main, "Mask Preprocessing")
    page.number(f"{AD}_ad_dilate_erode", 0)
    page.open_section(main, "Inpaint")
    page.number(f"{AD}_ad_mask_blur", 0)
    page.number(f"{AD}_ad_denoising_strength", 0.5)

    # 4. Generate, FreeFuse not yet in ADetailer's script names: the generation info says what to set, and every
    #    face pass loaded both LoRAs
    webui.loads.unlink(missing_ok=True)
    info = page.generate(2, "the image redrawn by ADetailer")
    page.mark("merged passes")
    page.shot("warned")
    assert f"ADetailer model: {MODEL}" in info and WARNING in info, info
    assert "FreeFuse ADetailer" not in info, info
    assert lora_calls(webui) == [[a, b]] * 4, lora_calls(webui)

    # 5. Settings > ADetailer: add freefuse to the script names, Apply settings (README "With ADetailer")
    page.find("#tab_settings-button").click()
    page.type_into("#settings_search input", "ADetailer")
    names = "#setting_ad_script_names textarea, #setting_ad_script_names input"
    assert page.value(names) == ADETAILER_DEFAULT_SCRIPTS, page.value(names)
    from selenium.webdriver.common.keys import Keys

    box = page.find(names)
    box.click()
    box.send_keys(Keys.CONTROL, Keys.END)
    box.send_keys(",freefuse", Keys.TAB)
    page.wait_value(names, ADETAILER_DEFAULT_SCRIPTS + ",freefuse")
    page.shot("settings")
    page.find("#settings_submit").click()
    page.wait(lambda d: "ad_script_names" in page.text("#settings_result"), "the settings to be applied")
    page.find("#tab_txt2img-button").click()

    # 6. Generate again: the generation info names each pass's LoRA, no warning; each face pass loaded only its own
    #    subject's LoRA, the shared region both; the masks are the same
    webui.loads.unlink(missing_ok=True)
    info = page.generate(2, "the image redrawn with FreeFuse in ADetailer's passes")
    page.mark("own passes")
    page.shot("redrawn")
    assert passes_line(a, b) in info and WARNING not in info, info
    assert lora_calls(webui) == [[a, b], [a], [b], [a, b]], lora_calls(webui)
    assert owners(*_gallery_pngs(page)[:2]) == owner
