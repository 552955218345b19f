"""The webui tier's browser: headless Chromium driven by Selenium through Forge's page (test_browser.py, and the
ADetailer workflow in test_adetailer_passes.py).

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver; FREEFUSE_CHROMIUM and
FREEFUSE_CHROMEDRIVER override the paths) and `selenium` in the test process; `MISSING` says what is missing, for a
skip. `Page` drives Gradio 4 components by elem_id with explicit waits and numbered screenshots; `drive` runs a test's
steps with its screenshots under pytest's tmp_path (their paths are printed; run with -s to see them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FREEFUSE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FREEFUSE_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,2000",
)
UI_TIMEOUT_S = 60.0  # a page load or a UI round trip on a slow, shared CPU
GENERATE_TIMEOUT_S = 600.0  # the first job also loads the tiny model
TAB = "txt2img"
FF = f"freefuse-{TAB}"


def browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed in the test process (pip install selenium)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"no {path} (apt-get install -y chromium chromium-driver: {package})"
    return ""


MISSING = browser_missing()


@contextlib.contextmanager
def chromium():
    """Headless Chromium with a fresh profile (conftest's `browser` fixture)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.TemporaryDirectory(prefix="freefuse-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile.name}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


class Page:
    """Forge's page in the browser: Gradio 4 components by elem_id, explicit waits, numbered screenshots."""

    def __init__(self, driver, shots: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.shots, self.By, self.Wait = driver, shots, By, WebDriverWait
        self.started = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    # -------------------------------------------------------------------------------------------- plumbing

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.started))

    def shot(self, name: str) -> Path:
        path = self.shots / f"{len(list(self.shots.glob('*.png'))) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def shot_element(self, css: str, name: str) -> Path:
        """A screenshot of one element, whole (the accordion as a user sees it)."""
        path = self.shots / f"{len(list(self.shots.glob('*.png'))) + 1:02d}-{name}.png"
        self.find(css).screenshot(str(path))
        return path

    def wait(self, condition, message: str, timeout: float = UI_TIMEOUT_S):
        """condition(driver) -> truthy; on time-out, a failure that says what was awaited."""
        from selenium.common.exceptions import TimeoutException

        try:
            return self.Wait(self.driver, timeout, poll_frequency=0.2).until(condition)
        except TimeoutException:
            path = self.shot("timeout")
            pytest.fail(f"waited {timeout:.0f} s for {message} (screenshot: {path})")

    def find(self, css: str):
        return self.wait(lambda d: visible(d.find_elements(self.By.CSS_SELECTOR, css)), f"a visible {css}")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def value(self, css: str) -> str:
        return self.js("const e = document.querySelector(arguments[0]); return e ? String(e.value) : null;", css)

    def checked(self, css: str) -> bool:
        return bool(self.js("const e = document.querySelector(arguments[0]); return !!(e && e.checked);", css))

    def wait_value(self, css: str, expected: str, timeout: float = UI_TIMEOUT_S) -> None:
        self.wait(lambda d: self.value(css) == expected, f"{css} to read {expected!r} (it reads {self.value(css)!r})")

    # ------------------------------------------------------------------------------------------ components

    def open_page(self, url: str) -> None:
        self.driver.get(url)
        self.find(f"#{TAB}_prompt textarea")
        # inputAccordion.js (onUiLoaded) adds the accordion's visible checkbox; freefuse.js defines window.FreeFuse
        self.wait(
            lambda d: self.js(f"return !!(window.FreeFuse && document.getElementById('{FF}-visible-checkbox'))"),
            "Forge's onUiLoaded scripts (inputAccordion.js, freefuse.js)",
        )

    def type_into(self, css: str, text: str) -> None:
        """Replace the text of an input/textarea as a user does: select all, type, leave the field (Tab)."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(css)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(str(text), Keys.TAB)
        self.wait_value(css, str(text))

    def number(self, elem_id: str, value) -> None:
        """A gr.Slider's or gr.Number's number box."""
        self.type_into(f"#{elem_id} input[type=number]", value)

    def choose(self, elem_id: str, option: str) -> None:
        """Pick an option of a Gradio 4 dropdown from its list (typing filters it; a click picks)."""
        css = f"#{elem_id} input"
        box = self.find(css)
        if box.get_attribute("value") == option:
            return
        box.click()
        item = self.find(f'#{elem_id} ul.options li[aria-label="{option}"]')
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", item)
        item.click()
        self.wait_value(css, option)

    def accordion_open(self, elem_id: str) -> bool:
        return bool(self.js(f"return document.querySelector('#{elem_id} > .label-wrap').classList.contains('open')"))

    def open_accordion(self, elem_id: str) -> None:
        if not self.accordion_open(elem_id):
            self.find(f"#{elem_id} > .label-wrap").click()
        self.wait(lambda d: self.accordion_open(elem_id), f"#{elem_id} to open")

    def open_section(self, within: str, label: str) -> None:
        """Open a gr.Accordion that has no elem_id, found by the start of its label inside #`within`."""
        find = """return [...document.querySelectorAll('#' + arguments[0] + ' .label-wrap')].find(
            (w) => w.offsetParent && w.innerText.trim().startsWith(arguments[1]));"""
        wrap = self.wait(lambda d: self.js(find, within, label), f"a section {label!r} in #{within}")
        if "open" not in wrap.get_attribute("class").split():
            self.js("arguments[0].scrollIntoView({block: 'center'})", wrap)
            wrap.click()
        self.wait(lambda d: "open" in self.js(find, within, label).get_attribute("class").split(), f"{label!r} open")

    def tick(self, elem_id: str, on: bool = True) -> None:
        css = f"#{elem_id} input[type=checkbox]"
        if self.checked(css) != on:
            self.find(css).click()
        self.wait(lambda d: self.checked(css) == on, f"{css} to be {'ticked' if on else 'clear'}")

    def set_prompt(self, text: str) -> None:
        """Paste `text` into the prompt box (as Ctrl+V would: one input event)."""
        css = f"#{TAB}_prompt textarea"
        box = self.find(css)
        self.js(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            box,
            text,
        )
        self.wait_value(css, text)

    def gallery_images(self) -> list[dict]:
        """The gallery's images that have loaded, once each (Gradio 4 renders a thumbnail strip and a grid of them):
        natural size and source."""
        return self.js(
            f"""const seen = new Map();
            for (const img of document.querySelectorAll('#{TAB}_gallery .thumbnail-item img')) {{
                if (img.complete && img.naturalWidth > 0 && !seen.has(img.src))
                    seen.set(img.src, {{w: img.naturalWidth, h: img.naturalHeight, src: img.src}});
            }}
            return [...seen.values()];"""
        )

    def job_over(self) -> bool:
        """No job running: Forge's ui.js shows Interrupt from the Generate click until the job ends."""
        return bool(self.js(f"return !document.querySelector('#{TAB}_interrupt').offsetParent"))

    def generate(self, images: int, what: str) -> str:
        """Press Generate, wait until the job is over with a new generation info and at least `images` images in the
        gallery; the info (the job's infotext). The job's infotext must differ from the one shown before."""
        before = self.infotext()
        self.find(f"#{TAB}_generate").click()
        self.wait(
            lambda d: self.job_over() and self.infotext() not in ("", before) and len(self.gallery_images()) >= images,
            what,
            GENERATE_TIMEOUT_S,
        )
        return self.infotext()

    def infotext(self) -> str:
        return self.js(f"const e = document.querySelector('#html_info_{TAB}'); return e ? e.innerText.trim() : '';")

    def text(self, css: str) -> str:
        """The text of an element as shown (innerText), "" when absent."""
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)

    def options(self, elem_id: str) -> tuple[list[str], list[str]]:
        """Open a dropdown's list: (the choices it shows, those it hides); closed again with Escape."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input")
        self.js("arguments[0].blur()", box)  # Gradio opens the list on focus: a box still focused would not open
        box.click()
        self.wait(
            lambda d: self.js(f"return document.querySelectorAll('#{elem_id} ul.options li').length > 0"), "a list"
        )
        shown, hidden = self.js(
            f"""const shown = [], hidden = [];
            for (const li of document.querySelectorAll('#{elem_id} ul.options li'))
                (li.offsetParent ? shown : hidden).push(li.getAttribute('aria-label'));
            return [shown, hidden];"""
        )
        box.send_keys(Keys.ESCAPE)
        self.js("arguments[0].blur()", box)
        return shown, hidden

    def page_says(self, text: str) -> bool:
        """True when the page shows `text` anywhere (a pop-up's message, a help line)."""
        return bool(self.js("return document.body.innerText.includes(arguments[0])", text))

    def shown_rows(self) -> list[bool]:
        """Which of the four subject rows are shown (freefuse.js hides rows 3-4 until needed)."""
        return self.js(f"return [0, 1, 2, 3].map((i) => !!document.getElementById('{FF}-subject-' + i)?.offsetParent);")

    def rect(self, css: str) -> dict:
        """The element's box on screen: top, bottom, left, right, height."""
        return self.js("return document.querySelector(arguments[0]).getBoundingClientRect().toJSON();", css)

    def missing(self, row: int | str) -> str:
        """The text of freefuse.js's live warning under a row's words (row "background": under the background
        words); "" when hidden or absent."""
        return self.js(
            "const e = document.getElementById(arguments[0]); return e && !e.hidden ? e.textContent : '';",
            f"{FF}-missing-{row}",
        )


def forge_assets_blocked(url: str) -> str:
    """Forge's page loads its own script.js, javascript/*.js and style.css as /file=<path under Forge>. Gradio 4
    serves only allowed paths, and Forge allows only its --data-dir by default: with the fixture's temporary data
    dir, every Forge script is refused (403) and the page has no onUiLoaded, no input accordions, no paste."""
    try:
        with urllib.request.urlopen(url + "/file=script.js", timeout=30):
            return ""
    except urllib.error.HTTPError as error:
        return f"Forge's own script.js is refused by its webui: HTTP {error.code}"


def visible(elements):
    shown = [e for e in elements if e.is_displayed()]
    return shown[0] if shown else False


def job_defaults(webui, checkpoint: str = "", size: int = 64) -> None:
    """UI defaults that match the job (the tiny checkpoint, or `checkpoint` by its model name; size x size), so
    Forge's own page-load update of the preset's fields (a Gradio load event, which can land after the page is shown)
    sets what the test sets; the test still sets them in the page."""
    title = webui.model_title(checkpoint or webui.checkpoint)
    webui.post(
        "/sdapi/v1/options",
        {
            "sd_model_checkpoint": title,
            # Neo: each UI preset remembers its own checkpoint (classic has no such option, and refuses it)
            **({"forge_checkpoint_flux": title} if webui.neo else {}),
            "forge_preset": "flux",
            "flux_t2i_width": size,
            "flux_t2i_height": size,
            "flux_t2i_cfg": 1,
            "flux_t2i_sampler": "Euler",  # "Euler a" gives NaN on the random tiny FLUX
            "flux_t2i_scheduler": "Simple",
        },
    )


def drive(steps, browser, tmp_path, webui) -> None:
    """Run `steps(page, webui)` with screenshots under tmp_path; on failure, one more screenshot and the server log."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = Page(browser, shots)
    try:
        steps(page, webui)
    except BaseException:
        print(f"\n[browser] failed; screenshot: {page.shot('failure')}\n{webui.log_tail(30)}")
        raise
    finally:
        print(f"\n[browser] screenshots in {shots}:")
        for path in sorted(shots.glob("*.png")):
            print(f"[browser]   {path}")
        print("[browser] " + ", ".join(f"{what} at {at:.1f} s" for what, at in page.marks))
