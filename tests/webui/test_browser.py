"""FreeFuse in Forge's real page, driven by headless Chromium (Selenium): fill two bindings and a half-filled row,
generate, see the mask overlay and the row's warning, see the live hints, paste the infotext back and see the
accordion restored; LoRA cards, activation words, "Fill from prompt", the LoRA list's refresh, the help, img2img's
capture-step line.

The browser and its `Page` helper are browser_page.py's (what it needs: Debian's chromium and chromium-driver, and
selenium in the test process; skips with the reason otherwise). Screenshots go to pytest's tmp_path (their paths are
printed; run with -s to see them).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from browser_page import FF, GENERATE_TIMEOUT_S, MISSING, TAB, Page, drive, forge_assets_blocked, job_defaults, visible

from lib_freefuse.args import FreeFuseArgs

BINDINGS = (("tiny_lora_a", "cat"), ("tiny_lora_b", "dog"))
PROMPT = "a photo of a cat and a dog in a garden <lora:tiny_lora_a:0.8> <lora:tiny_lora_b:0.8>"
# javascript/freefuse.js's hints under a half-filled row
NO_WORDS = "No activation words: this row acts as an ordinary LoRA until you type its subject's words"
NO_LORA = "No LoRA: these words bind nothing until you pick one"
BACKGROUND_WORDS = f"#{FF}-background-words input, #{FF}-background-words textarea"  # a one-line Textbox
BACKGROUND_DEFAULT = "Free at background words (default)"

pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING)  # before the webui fixture starts a server


def _assert_accordion(page: Page, bindings, capture_block: str, show_masks: bool) -> None:
    assert page.accordion_open(FF), "the FreeFuse accordion is closed"
    assert page.checked(f"#{FF}-checkbox input"), "FreeFuse's (hidden) enabled checkbox is clear"
    assert page.checked(f"#{FF}-visible-checkbox"), "the accordion's visible checkbox is clear"
    rows = [(page.value(f"#{FF}-lora-{i} input"), page.value(f"#{FF}-words-{i} textarea")) for i in range(4)]
    assert rows == [*bindings, ("", ""), ("", "")][:4], rows
    weights = [page.value(f"#{FF}-weight-{i} input[type=number]") for i in range(4)]
    assert weights == ["1"] * 4, weights
    assert page.value(f"#{FF}-capture-block input[type=number]") == capture_block
    assert page.checked(f"#{FF}-show-masks input[type=checkbox]") == show_masks
    assert page.shown_rows() == [True, True, False, False], page.shown_rows()  # two rows bound: rows 3-4 hidden


SECTIONS = ("timing", "loras", "recipe")  # lib_freefuse.args.SECTIONS, closed at first
JARGON = ("Eq.", "paper", "authors", "per_token", "own_words", "text_queries", "image_queries", "double_blocks")


def _assert_calm_accordion(page: Page) -> None:
    """Issue 15, point 6: two subject rows and "Add subject", then "Show masks", then three closed sections (the
    mask recipe's groups nested in the last); plain labels and choices; each checkbox's description under it."""
    assert page.shown_rows() == [True, True, False, False], page.shown_rows()
    assert [page.text(f"#{FF}-lora-{i} [data-testid=block-info]").strip() for i in range(2)] == ["1. LoRA", "2. LoRA"]
    assert page.find(f"#{FF}-add-subject").is_displayed()
    assert not any(page.accordion_open(f"{FF}-{key}") for key in SECTIONS)
    rows, show, first = page.rect(f"#{FF}-subject-1"), page.rect(f"#{FF}-show-masks"), page.rect(f"#{FF}-timing")
    assert rows["bottom"] <= show["top"] and show["bottom"] <= first["top"], (rows, show, first)
    height = page.rect(f"#{FF}")["height"]
    assert height < 1000, f"the accordion is {height:.0f} px tall with its sections closed"
    page.shot_element(f"#{FF}", "accordion-calm")
    for key in SECTIONS:
        page.open_accordion(f"{FF}-{key}")
    shown = page.text(f"#{FF}")
    assert [word for word in JARGON if word in shown] == [], shown
    for part in ("attention", "growth", "regions", "background"):  # the mask recipe's groups
        assert page.js(f"return !!document.querySelector('#{FF}-recipe #{FF}-{part}')"), part
    assert page.options(f"{FF}-modulation")[0] == ["Inside each mask (default)", "Whole image", "Left out"]
    assert page.value(f"#{FF}-modulation input") == "Inside each mask (default)"
    # every checkbox's description sits under its own checkbox (Gradio puts it above, where it reads as the last's)
    placed = page.js(
        f"""return [...document.querySelectorAll('#{FF} .freefuse-check')].map((block) => {{
            const label = block.querySelector('label').getBoundingClientRect();
            const info = [...block.children].find((c) => c.tagName === 'DIV' && c.textContent.trim());
            return [block.id, label.bottom <= info.getBoundingClientRect().top + 1];
        }});"""
    )
    defaults = FreeFuseArgs().to_dict()
    checkboxes = [key for key, value in defaults.items() if isinstance(value, bool) and key != "enabled"]  # all 7
    assert sorted(id for id, _ in placed) == sorted(f"{FF}-{key.replace('_', '-')}" for key in checkboxes), placed
    assert all(below for _, below in placed), placed
    page.shot_element(f"#{FF}", "sections-open")


def _job_settings(page: Page) -> None:
    """txt2img's settings of the test's jobs, set in the page: Euler, Simple, 64x64, 6 steps, CFG 1, seed 1234."""
    page.choose(f"{TAB}_sampling", "Euler")
    page.choose(f"{TAB}_scheduler", "Simple")
    page.number(f"{TAB}_width", 64)
    page.number(f"{TAB}_height", 64)
    page.number(f"{TAB}_steps", 6)
    page.number(f"{TAB}_cfg_scale", 1)
    page.number(f"{TAB}_seed", 1234)
    page.set_prompt(PROMPT)


def test_fill_generate_see_masks_paste_back(webui, browser, tmp_path):
    blocked = forge_assets_blocked(webui.url)
    if blocked:
        pytest.fail(
            f"{blocked}: Forge allows Gradio to serve only its --data-dir; the webui fixture must also pass "
            "--gradio-allowed-path <Forge's root> (tests/webui/conftest.py), else Forge's page has no JavaScript"
        )
    job_defaults(webui)
    try:
        drive(_run, browser, tmp_path, webui)
    finally:
        webui.post("/sdapi/v1/options", {"freefuse_save_overlays": False})


def _saved_overlays(webui) -> set[Path]:
    return {path for path in webui.data_dir.rglob("*-freefuse-masks.png") if "extensions" not in path.parts}


def _run(page: Page, webui) -> None:
    # 1. Settings > FreeFuse: save a mask overlay beside each image; then txt2img with the job's settings and prompt
    page.open_page(webui.url)
    page.mark("page up")
    page.find("#tab_settings-button").click()
    page.type_into("#settings_search input", "mask overlay")
    page.tick("setting_freefuse_save_overlays")
    page.find("#settings_submit").click()
    page.wait(lambda d: "freefuse_save_overlays" in page.text("#settings_result"), "the settings to be applied")
    page.find("#tab_txt2img-button").click()
    saved_before = _saved_overlays(webui)
    _job_settings(page)

    # 2. FreeFuse: open (= enable); its help shows every column, <lora:NAME:...> as written; the rows are numbered
    page.open_accordion(FF)
    help_text = page.text(f"#{FF}-help")
    for expected in (
        "binds a LoRA (its <lora:NAME:...> name)",
        "Weight: LoRA strength used only when the prompt has no <lora:NAME:...> tag for this LoRA",
        "Fill from prompt: one row per <lora:NAME:weight> tag",
        "Also LoRAs without activation words (styles): ",
    ):
        assert expected in help_text, f"{expected!r} not in the help:\n{help_text}"
    assert [page.text(f"#{FF}-lora-{i} [data-testid=block-info]").strip() for i in range(4)] == [
        f"{i}. LoRA" for i in (1, 2, 3, 4)
    ]
    # the calm accordion: two rows, "Show masks", then three closed sections; rows 3-4 come with "Add subject"
    _assert_calm_accordion(page)
    # bind the two LoRAs, masks (shown first), capture block 1 (the tiny model has 2 double blocks), a plain-language
    # choice (stored as all), "Start over once the masks exist" off
    for row, (lora, words) in enumerate(BINDINGS):
        page.type_into(f"#{FF}-words-{row} textarea", words)  # words first: picking a LoRA fills only empty words
        page.choose(f"{FF}-lora-{row}", lora)
    page.tick(f"{FF}-show-masks")
    page.open_accordion(f"{FF}-timing")
    page.number(f"{FF}-capture-block", 1)
    page.open_accordion(f"{FF}-loras")
    page.choose(f"{FF}-text-loras", "All but on others' words")
    # the background named by words of the prompt: a phrase the prompt lacks is named live under their box
    page.open_accordion(f"{FF}-recipe")
    assert page.value(f"#{FF}-background input") == BACKGROUND_DEFAULT  # words given are used as they come
    page.type_into(BACKGROUND_WORDS, "misty forest")
    page.wait(lambda d: page.missing("background") == "Not in the prompt: misty forest", "the background words' hint")
    page.shot("background-words-missing")
    page.type_into(BACKGROUND_WORDS, "garden")
    page.wait(lambda d: page.missing("background") == "", "the background words' hint to go")
    _assert_accordion(page, BINDINGS, "1", True)
    # a half-filled third row (a LoRA, no words yet), added with "Add subject": its hint says so, and it must not
    # cost the job
    page.find(f"#{FF}-add-subject").click()
    page.wait(lambda d: page.shown_rows() == [True, True, True, False], "Add subject to show row 3")
    page.type_into(f"#{FF}-lora-2 input", "c_new")
    page.wait(lambda d: page.missing(2) == NO_WORDS, f"#{FF}-missing-2 to say the row has no words")
    assert page.missing(0) == page.missing(1) == "", "a hint under a complete row"
    page.mark("form filled")
    page.shot("filled")

    # 3. Generate: the image and its mask overlay
    page.find(f"#{TAB}_generate").click()
    page.wait(
        lambda d: (
            len(page.gallery_images()) >= 2
            and "FreeFuse" in page.infotext()
            and page.js(f"return !document.querySelector('#{TAB}_interrupt').offsetParent")  # the job is over
        ),
        "the job to end with the image and its mask overlay in the gallery",
        GENERATE_TIMEOUT_S,
    )
    page.mark("generated")
    images, infotext = page.gallery_images(), page.infotext()
    page.shot("generated")
    assert len(images) == 2, images
    assert all((image["w"], image["h"]) == (64, 64) for image in images), images
    assert images[0]["src"] != images[1]["src"]
    for expected in (
        "Steps: 6",
        "Sampler: Euler,",
        "Schedule type: Simple",
        "CFG scale: 1",
        "Seed: 1234",
        "Size: 64x64",
        f"Model: {webui.checkpoint}",
        'FreeFuse: "tiny_lora_a: cat; tiny_lora_b: dog"',  # the bindings as one readable line
        "FreeFuse capture block: 1",
        "FreeFuse show masks: True",
        "FreeFuse text loras: all",  # the stored value of the plain label "All but on others' words"
        "FreeFuse background words: garden",
        "FreeFuse coverage:",
        # the half-filled row, numbered as on screen, is the job's one warning
        'FreeFuse warnings: "row 3 (c_new): no activation words: it acts as an ordinary LoRA"',
    ):
        assert expected in infotext, f"{expected!r} not in the infotext:\n{infotext}"
    assert infotext.count("FreeFuse warnings") == 1 and "FreeFuse subjects" not in infotext, infotext
    assert "FreeFuse background:" not in infotext, infotext  # the default, left out
    page.find(f'#{TAB}_gallery .thumbnail-item img[src="{images[1]["src"]}"]').click()  # preview the overlay
    page.wait(
        lambda d: page.js(
            f"return [...document.querySelectorAll('#{TAB}_gallery img')].some("
            "(img) => img.src === arguments[0] && !img.closest('.thumbnail-item') && img.naturalWidth > 0)",
            images[1]["src"],
        ),
        "the gallery to preview the mask overlay",
    )
    page.shot("mask-overlay")
    saved = _saved_overlays(webui) - saved_before  # beside the saved image, with its seed in the name
    assert [path.name.split("-", 1)[1] for path in saved] == ["1234-freefuse-masks.png"], saved
    assert any(path.name.endswith("-1234.png") for path in next(iter(saved)).parent.iterdir())  # the image

    # 4. freefuse.js: a bound phrase missing from the prompt is shown live, and goes once the prompt has it
    assert page.missing(0) == page.missing(1) == "", "a warning although every phrase is in the prompt"
    page.type_into(f"#{FF}-words-1 textarea", "dog, unicorn")
    page.wait(lambda d: "unicorn" in page.missing(1), f"#{FF}-missing-1 to name the missing phrase")
    assert page.missing(1) == "Not in the prompt: unicorn" and page.missing(0) == ""
    page.shot("missing-word")
    page.type_into(f"#{FF}-lora-2 input", "")  # words without a LoRA: the hint says that instead
    page.type_into(f"#{FF}-words-2 textarea", "garden")
    page.wait(lambda d: page.missing(2) == NO_LORA, f"#{FF}-missing-2 to say the row has no LoRA")
    from selenium.webdriver.common.keys import Keys

    page.find(f"#{TAB}_prompt textarea").send_keys(Keys.CONTROL, Keys.END)
    page.find(f"#{TAB}_prompt textarea").send_keys(" and a unicorn")  # typed, key by key
    page.wait(lambda d: page.missing(1) == "", f"#{FF}-missing-1 to go once the prompt has the phrase")
    assert page.value(f"#{TAB}_prompt textarea") == PROMPT + " and a unicorn"
    page.mark("warning checked")

    # 5. A fresh page; the infotext pasted into the prompt and read back (Forge's "Read generation parameters")
    page.open_page(webui.url)
    assert not page.accordion_open(FF) and page.value(f"#{FF}-lora-0 input") == ""
    page.set_prompt(infotext)
    page.find(f"#{TAB}_tools #paste").click()
    page.wait(
        lambda d: page.accordion_open(FF) and page.value(f"#{FF}-words-1 textarea") == "dog",
        "the pasted parameters to open FreeFuse and fill its rows",
    )
    page.wait_value(f"#{TAB}_steps input[type=number]", "6")
    page.wait_value(f"#{FF}-capture-block input[type=number]", "1")
    page.wait_value(f"#{FF}-text-loras input", "All but on others' words")  # the pasted all, shown by its label
    page.wait_value(BACKGROUND_WORDS, "garden")
    page.wait_value(f"#{FF}-background input", BACKGROUND_DEFAULT)
    page.open_accordion(f"{FF}-timing")
    _assert_accordion(page, BINDINGS, "1", True)
    if webui.neo:  # this Neo release leaves the pasted text in the prompt box (classic replaces it with the prompt)
        assert page.value(f"#{TAB}_prompt textarea").startswith(PROMPT + "\nSteps: 6")
    else:
        assert page.value(f"#{TAB}_prompt textarea") == PROMPT
    assert page.value(f"#{TAB}_seed input") == "1234"
    page.mark("pasted back")
    page.shot("pasted")


# --------------------------------------------------------------------------------- LoRA cards of extra networks

LORA_TAB_BUTTON = f"#{TAB}_lora-button"  # Gradio 4 gives a gr.Tab's button the id <elem_id>-button
GENERATION_TAB_BUTTON = f"//*[@id='{TAB}_extra_tabs']//button[@role='tab' and normalize-space()='Generation']"


def _lora_tag(name: str) -> re.Pattern:
    return re.compile(rf"<lora:{re.escape(name)}:[\d.]+>")


def test_lora_card_click_fills_next_empty_row(webui, browser, tmp_path):
    """freefuse.js: while the accordion is open, a click on a LoRA card of the Lora tab puts that LoRA into the first
    row without one (Forge still adds the card's tag to the prompt); while it is closed, a click leaves the rows."""
    if forge_assets_blocked(webui.url):
        pytest.fail("Forge's own script.js is refused by its webui (see test_fill_generate_see_masks_paste_back)")
    drive(_run_lora_cards, browser, tmp_path, webui)


def _run_lora_cards(page: Page, webui) -> None:
    prompt_css = f"#{TAB}_prompt textarea"

    def rows() -> list[str]:
        return [page.value(f"#{FF}-lora-{i} input") for i in range(4)]

    def generation_tab() -> None:
        page.wait(  # gr.Tab("Generation") has an id but no elem_id: its button is found by its text
            lambda d: visible(d.find_elements(page.By.XPATH, GENERATION_TAB_BUTTON)), "the Generation tab's button"
        ).click()
        page.find(f"#{FF} > .label-wrap")

    def lora_tab() -> None:
        page.find(LORA_TAB_BUTTON).click()
        page.find(f"#{TAB}_lora_cards")

    def click_card(name: str, tag_after: bool) -> None:
        """Click the card as a user does; Forge's onclick adds the tag (or removes it when the prompt has it)."""
        page.find(f'#{TAB}_lora_cards .card[data-name="{name}"]').click()
        page.wait(
            lambda d: bool(_lora_tag(name).search(page.value(prompt_css))) == tag_after,
            f"Forge's card click to {'add' if tag_after else 'remove'} the <lora:{name}:...> tag "
            f"(the prompt reads {page.value(prompt_css)!r})",
        )

    # 1. a fresh page, a prompt without tags, FreeFuse open with its four rows empty
    page.open_page(webui.url)
    page.mark("page up")
    page.set_prompt("a photo of a cat and a dog")
    page.open_accordion(FF)
    assert rows() == ["", "", "", ""], rows()

    # 2. the Lora tab of the extra networks; a click on tiny_lora_b's card fills row 0 and adds its tag
    lora_tab()
    page.mark("lora tab")
    click_card("tiny_lora_b", True)
    page.wait(lambda d: rows()[0] == "tiny_lora_b", f"#{FF}-lora-0 to read 'tiny_lora_b' (rows: {rows()})")
    assert rows() == ["tiny_lora_b", "", "", ""], rows()
    prompt = page.value(prompt_css)
    assert prompt.startswith("a photo of a cat and a dog") and len(_lora_tag("tiny_lora_b").findall(prompt)) == 1
    # no metadata here: the row has no words, and its hint asks for them (a job would warn, not fail)
    page.wait(lambda d: page.missing(0) == NO_WORDS, f"#{FF}-missing-0 to say the row needs words")
    page.shot("card-b")

    # 3. tiny_lora_a's card: the next empty row, and its tag after b's
    click_card("tiny_lora_a", True)
    page.wait(lambda d: rows()[1] == "tiny_lora_a", f"#{FF}-lora-1 to read 'tiny_lora_a' (rows: {rows()})")
    assert rows() == ["tiny_lora_b", "tiny_lora_a", "", ""], rows()
    prompt = page.value(prompt_css)
    b_tag, a_tag = _lora_tag("tiny_lora_b").search(prompt), _lora_tag("tiny_lora_a").search(prompt)
    assert b_tag and a_tag and b_tag.start() < a_tag.start(), prompt
    page.shot("card-a")
    page.mark("cards while open")

    # 4. the rows are kept when the user goes back to the Generation tab (what the server sees, after a blur); the
    #    words the user then types end the hint
    generation_tab()
    assert page.accordion_open(FF)
    page.wait_value(f"#{FF}-lora-0 input", "tiny_lora_b")
    page.wait_value(f"#{FF}-lora-1 input", "tiny_lora_a")
    page.type_into(f"#{FF}-words-0 textarea", "dog")
    page.wait(lambda d: page.missing(0) == "", f"#{FF}-missing-0 to go once the row has words")

    # 5. the user empties row 1 and closes the accordion: a click on tiny_lora_a's card (which would go to row 1 if
    #    FreeFuse were open) now only toggles Forge's tag, and the rows stay as they are
    page.type_into(f"#{FF}-lora-1 input", "")
    page.find(f"#{FF} > .label-wrap").click()
    page.wait(lambda d: not page.accordion_open(FF), f"#{FF} to close")
    lora_tab()
    click_card("tiny_lora_a", False)  # the prompt had the tag: Forge removes it
    click_card("tiny_lora_a", True)  # and adds it back
    time.sleep(0.5)  # a handler that wrongly acted would have set the row synchronously; leave Gradio a moment
    assert rows() == ["tiny_lora_b", "", "", ""], rows()
    page.shot("card-a-closed")
    page.mark("card while closed")

    # 6. a LoRA file added after start-up: the Lora tab's own refresh shows its card, and the rows' lists learn it
    added = webui.data_dir / "models" / "Lora" / "tiny_lora_new.safetensors"
    added.write_bytes((webui.data_dir / "models" / "Lora" / "tiny_lora_a.safetensors").read_bytes())
    try:
        page.find(f"#{TAB}_lora_extra_refresh").click()
        page.find(f'#{TAB}_lora_cards .card[data-name="tiny_lora_new"]')
        generation_tab()
        page.open_accordion(FF)
        page.wait(
            lambda d: "tiny_lora_new" in page.options(f"{FF}-lora-1")[0],
            f"#{FF}-lora-1's list to offer tiny_lora_new after the Lora tab's refresh",
        )
        page.shot("refreshed-by-lora-tab")
    finally:
        added.unlink(missing_ok=True)
        webui.post("/sdapi/v1/refresh-loras", {})
    page.mark("lora tab refresh")


# ------------------------------------------------------------------------------ activation words from metadata

LORA_METADATA = {
    "tiny_lora_a": {"activation text": "cat", "preferred weight": 0.8},
    "tiny_lora_b": {"activation text": "dog"},
}
FILL_PROMPT = "a cat and a dog <lora:tiny_lora_b:0.7> <lora:tiny_lora_a:0.9>"


def test_activation_words_fill_rows(webui, browser, tmp_path):
    """scripts/freefuse.py: picking a LoRA in a row with empty words fills them from the `<lora>.json` beside the
    file ("activation text"); "Fill from prompt" makes one row per <lora:NAME:w> tag, with those words and w."""
    if forge_assets_blocked(webui.url):
        pytest.fail("Forge's own script.js is refused by its webui (see test_fill_generate_see_masks_paste_back)")
    lora_dir = webui.data_dir / "models" / "Lora"
    written = []
    try:
        for name, metadata in LORA_METADATA.items():
            path = lora_dir / f"{name}.json"
            assert not path.exists(), f"{path} exists already"
            written.append(path)
            path.write_text(json.dumps(metadata), encoding="utf-8")
        drive(_run_activation_words, browser, tmp_path, webui)
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def _run_activation_words(page: Page, webui) -> None:
    from selenium.webdriver.common.keys import Keys

    def rows() -> list[tuple[str, str, str]]:
        return [
            (
                page.value(f"#{FF}-lora-{i} input"),
                page.value(f"#{FF}-words-{i} textarea"),
                page.value(f"#{FF}-weight-{i} input[type=number]"),
            )
            for i in range(4)
        ]

    empty = [("", "", "1")] * 4

    # 1. a fresh page, FreeFuse open, its rows empty; the user types tiny_lora_a into row 0's dropdown and presses
    #    Enter: Gradio fires the dropdown's input event and the server fills the empty words from tiny_lora_a.json
    page.open_page(webui.url)
    page.mark("page up")
    page.open_accordion(FF)
    assert rows() == empty, rows()
    box = page.find(f"#{FF}-lora-0 input")
    box.click()
    box.send_keys("tiny_lora_a")
    page.find(f'#{FF}-lora-0 ul.options li[aria-label="tiny_lora_a"]')  # the filtered list shows the option
    box.send_keys(Keys.ENTER)
    page.wait_value(f"#{FF}-lora-0 input", "tiny_lora_a")
    page.wait_value(f"#{FF}-words-0 textarea", "cat")
    assert rows() == [("tiny_lora_a", "cat", "1"), *empty[1:]], rows()
    page.shot("picked-a")
    page.mark("words from metadata")

    # 2. a fresh page (empty rows); a prompt with two LoRA tags, typed; "Fill from prompt" makes a row per tag, in
    #    the prompt's order, with each LoRA's activation words and the tag's weight; the other rows stay empty
    page.open_page(webui.url)
    page.open_accordion(FF)
    assert rows() == empty, rows()
    page.type_into(f"#{TAB}_prompt textarea", FILL_PROMPT)
    page.find(f"#{FF}-fill-from-prompt").click()
    expected = [("tiny_lora_b", "dog", "0.7"), ("tiny_lora_a", "cat", "0.9"), *empty[2:]]
    page.wait(lambda d: rows() == expected, f"the rows to be filled from the prompt's tags (rows: {rows()})")
    assert page.value(f"#{TAB}_prompt textarea") == FILL_PROMPT
    page.shot("filled-from-prompt")
    page.mark("filled from prompt")

    # 3. the user's own words for tiny_lora_a; b's row emptied, and tiny_lora_b loses its metadata (a style now).
    #    Fill again: a's words are kept, b is left out (the pop-up says why); ticked, b gets a row without words
    #    and its hint
    page.type_into(f"#{FF}-words-1 textarea", "kitty")
    page.type_into(f"#{FF}-lora-0 input", "")
    page.type_into(f"#{FF}-words-0 textarea", "")
    (webui.data_dir / "models" / "Lora" / "tiny_lora_b.json").unlink()
    page.find(f"#{FF}-fill-from-prompt").click()
    expected = [("tiny_lora_a", "kitty", "0.9"), *empty[1:]]
    page.wait(lambda d: rows() == expected, f"a's words kept and b left out (rows: {rows()})")
    page.wait(lambda d: page.page_says("left out tiny_lora_b: no activation words"), "the pop-up naming b")
    page.shot("style-left-out")
    page.tick(f"{FF}-fill-styles")
    page.find(f"#{FF}-fill-from-prompt").click()
    expected = [("tiny_lora_b", "", "0.7"), ("tiny_lora_a", "kitty", "0.9"), *empty[2:]]
    page.wait(lambda d: rows() == expected, f"the style bound too when asked (rows: {rows()})")
    page.wait(lambda d: page.missing(0) == NO_WORDS, f"#{FF}-missing-0 to say the row needs words")
    page.shot("style-included")

    # 4. a prompt without tags: the pop-up shows <lora:NAME:weight> as written
    page.set_prompt("a cat and a dog")
    page.find(f"#{FF}-fill-from-prompt").click()
    page.wait(lambda d: page.page_says("the prompt has no <lora:NAME:weight> tags"), "the no-tags pop-up, literally")
    page.shot("no-tags")
    page.mark("fill rules")

    # 5. a LoRA file added after start-up: the refresh button beside the rows reads the folder again; the lists do
    #    not show their empty choice
    added = webui.data_dir / "models" / "Lora" / "tiny_lora_c.safetensors"
    added.write_bytes((webui.data_dir / "models" / "Lora" / "tiny_lora_a.safetensors").read_bytes())
    try:
        page.find(f"#{FF}-add-subject").click()  # rows 1-2 are bound: a third row, empty
        page.wait(lambda d: page.shown_rows() == [True, True, True, False], "Add subject to show row 3")
        assert "tiny_lora_c" not in page.options(f"{FF}-lora-2")[0]
        page.find(f"#{FF}-refresh-loras").click()
        page.wait(lambda d: "tiny_lora_c" in page.options(f"{FF}-lora-2")[0], "tiny_lora_c in the refreshed list")
        shown, hidden = page.options(f"{FF}-lora-2")
        assert "" not in shown and hidden == [""] and {"tiny_lora_a", "tiny_lora_b"} <= set(shown), (shown, hidden)
        page.shot("refreshed")
    finally:
        added.unlink(missing_ok=True)
        webui.post("/sdapi/v1/refresh-loras", {})
    page.mark("refresh button")

    # 6. img2img: the capture-step line counts the steps the denoising strength runs (20 steps at 0.5: 11)
    page.find("#tab_img2img-button").click()
    page.open_accordion("freefuse-img2img")
    page.open_accordion("freefuse-img2img-timing")
    page.number("img2img_steps", 20)
    page.number("img2img_denoising_strength", 0.5)
    step = FreeFuseArgs().resolved_capture_step(11)
    line = f"Masks are made at step {step} of the 11 that denoising 0.5 runs of 20"
    page.wait(lambda d: page.text("#freefuse-img2img-capture-resolved").strip() == line, f"the line {line!r}")
    page.js("document.querySelector('#freefuse-img2img-capture-resolved').scrollIntoView({block: 'center'})")
    page.shot("img2img-steps")
    page.mark("img2img steps")


# ------------------------------------------------------------------------------------- X/Y/Z plot: masks in a cell

XYZ_SCRIPT = f"{TAB}_script_container #script_list"  # "elem_id" for Page.choose: Forge gives both tabs this id
XYZ = f"script_{TAB}_xyz_plot"  # Forge's Script.elem_id prefix of the X/Y/Z plot's components


def test_xyz_show_masks_axis_shows_each_true_cells_overlay(webui, browser, tmp_path):
    """Issue 15, point 8: the X/Y/Z plot with the axis "FreeFuse show masks" (False, True) and its sub images: the
    True cell is the False cell's image with its mask overlay (same seed, same job). First, a choice axis's fill
    button lists the accordion's plain labels (test_xyz.py: the cells record the stored values)."""
    if forge_assets_blocked(webui.url):
        pytest.fail("Forge's own script.js is refused by its webui (see test_fill_generate_see_masks_paste_back)")
    job_defaults(webui)
    drive(_run_xyz, browser, tmp_path, webui)


def _run_xyz(page: Page, webui) -> None:
    page.open_page(webui.url)
    page.mark("page up")
    _job_settings(page)
    page.open_accordion(FF)
    for row, (lora, words) in enumerate(BINDINGS):
        page.type_into(f"#{FF}-words-{row} textarea", words)
        page.choose(f"{FF}-lora-{row}", lora)
    page.open_accordion(f"{FF}-timing")
    page.number(f"{FF}-capture-block", 1)

    def x_values() -> list[str]:
        return page.js(
            f"return [...document.querySelectorAll('#{TAB}_script_container .token span')].map((s) => s.innerText)"
        )

    # Script: X/Y/Z plot. A choice axis's fill button gives the plain labels the accordion shows
    page.choose(XYZ_SCRIPT, "X/Y/Z plot")
    page.choose(f"{XYZ}_x_type", "FreeFuse LoRAs on text tokens")
    page.find(f"#{TAB}_script_container #xyz_grid_fill_x_tool_button").click()
    labels = ["Own words only (default)", "All but on others' words", "None"]
    page.wait(lambda d: x_values()[:3] == labels, f"the X values {labels} (they read {x_values()})")
    page.js(f"document.querySelector('#{TAB}_script_container').scrollIntoView({{block: 'center'}})")
    page.shot("xyz-labels")
    # X type: FreeFuse show masks; its values from the fill button (all choices: False, True)
    page.choose(f"{XYZ}_x_type", "FreeFuse show masks")
    page.find(f"#{TAB}_script_container #xyz_grid_fill_x_tool_button").click()
    page.wait(lambda d: x_values()[:3] == ["False", "True"], f"the X values False and True (they read {x_values()})")
    page.tick(f"{XYZ}_include_lone_images")
    page.shot("xyz-set")
    page.find(f"#{TAB}_generate").click()
    page.wait(
        lambda d: (
            len(page.gallery_images()) >= 3
            and page.js(f"return !document.querySelector('#{TAB}_interrupt').offsetParent")
        ),
        "the plot's grid and its two cells in the gallery",
        GENERATE_TIMEOUT_S,
    )
    page.mark("plotted")
    grid, image, overlay = page.gallery_images()
    assert (image["w"], image["h"]) == (overlay["w"], overlay["h"]) == (64, 64) and grid["w"] >= 128, (grid, image)
    differing = page.driver.execute_async_script(
        """const pixels = (src) => new Promise((resolve) => {
            const img = new Image();
            img.onload = () => {
                const canvas = document.createElement('canvas');
                canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
                const context = canvas.getContext('2d');
                context.drawImage(img, 0, 0);
                resolve(context.getImageData(0, 0, canvas.width, canvas.height).data);
            };
            img.src = src;
        });
        const done = arguments[arguments.length - 1];
        Promise.all([pixels(arguments[0]), pixels(arguments[1])]).then(([a, b]) => {
            let n = 0;
            for (let i = 0; i < a.length; i += 4) {
                if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2]) n++;
            }
            done(n);
        });""",
        image["src"],
        overlay["src"],
    )
    assert differing > 64 * 64 // 4, f"the True cell differs from the False cell in only {differing} pixels"
    page.shot("xyz-plotted")
