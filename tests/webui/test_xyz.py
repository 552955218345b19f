"""FreeFuse's axes in Forge's own X/Y/Z plot (scripts/xyz_grid.py), run through the API of a real webui.

The API gives the plot's values positionally, in its ui() order; an axis is an index into the txt2img axis list
(labels in /sdapi/v1/script-info), and an axis with choices takes its values from the dropdown list.
"""

from __future__ import annotations

import pytest
from test_freefuse_api import PROMPT, freefuse, tagged

XYZ = "x/y/z plot"
X_TYPE, X_VALUES, X_DROPDOWN, Y_TYPE, Y_VALUES, Y_DROPDOWN, Z_TYPE = range(7)
INCLUDE_LONE_IMAGES = 10  # each cell's image after the grid
SETTINGS = ("enabled", "capture step", "capture block", "sink filter", "self-attention", "superpixel vote")
MORE = (
    "pre-mask LoRA mode",
    "restart",
    "average steps",
    "average blocks",
    "modulation",
    "word-to-image attention",
    "LoRAs on text tokens",
    "attention bias",
    "contrastive seeds",
    "background",
    "background threshold",
    "fill holes",
    "surroundings",
    "superpixel image size",
    "show masks",
    "subject LoRA weight",
)
FREEFUSE_AXES = [f"FreeFuse {name}" for name in (*SETTINGS, *MORE, *(f"subject {i} LoRA weight" for i in range(1, 5)))]


def axis_labels(webui) -> list[str]:
    """The txt2img X/Y/Z plot's axis labels, in the order its axis indices count."""
    (xyz,) = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == XYZ and not s["is_img2img"]]
    return xyz["args"][X_TYPE]["choices"]


def plot_args(webui, x: tuple[str, str | list[str]], y: tuple[str, str | list[str]] = ("Nothing", "")) -> list:
    """The plot's 18 positional values (the API shifts later scripts' values if fewer are sent): X and Y axes as
    (label, "typed values" or [dropdown values]), no Z, each cell's image after the grid."""
    (xyz,) = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == XYZ and not s["is_img2img"]]
    values = [arg["value"] for arg in xyz["args"]]
    labels = xyz["args"][X_TYPE]["choices"]
    for start, (label, given) in ((X_TYPE, x), (Y_TYPE, y)):
        typed, dropdown = ("", given) if isinstance(given, list) else (given, [])
        values[start : start + 3] = [labels.index(label), typed, dropdown]
    values[Z_TYPE : Z_TYPE + 3] = [labels.index("Nothing"), "", []]
    values[INCLUDE_LONE_IMAGES] = True
    return values


def plot(webui, prompt: str, args: list, **settings):
    """A plot of small FreeFuse jobs (6 steps): images [grid, cell, cell, ...] and their infotexts."""
    return webui.txt2img(
        prompt, steps=6, script_name=XYZ, script_args=args, alwayson_scripts=freefuse(webui, **settings)
    )


def test_the_axes_are_listed_once_each(webui):
    labels = axis_labels(webui)
    assert [label for label in labels if label.startswith("FreeFuse ")] == FREEFUSE_AXES


def test_a_capture_step_axis_runs_one_cell_per_step(webui):
    log = webui.log()
    before = [log.count(f"capture at step {step} of 6 in") for step in (1, 2)]
    result = plot(webui, tagged(webui), plot_args(webui, ("FreeFuse capture step", "1, 2")))
    assert len(result.images) == 3  # the grid, then one image per value
    grid, *cells = result.images
    assert all((cell.width, cell.height) == (64, 64) for cell in cells) and grid.width >= 128
    log = webui.log()
    assert [log.count(f"capture at step {step} of 6 in") for step in (1, 2)] == [n + 1 for n in before]
    assert ["FreeFuse capture step: 1" in text for text in result.info["infotexts"][1:]] == [True, False]
    assert ["FreeFuse capture step: 2" in text for text in result.info["infotexts"][1:]] == [False, True]


def test_two_axes_compose_and_a_cell_without_freefuse_has_no_freefuse_infotext(webui):
    """X: FreeFuse on/off from the dropdown; Y: capture step. Cells run (on, 1), (off, 1), (on, 2), (off, 2)."""
    log = webui.log().count("FreeFuse: masks made")
    args = plot_args(webui, ("FreeFuse enabled", ["True", "False"]), ("FreeFuse capture step", "1-2"))
    result = plot(webui, tagged(webui), args)
    assert len(result.images) == 5
    on_1, off_1, on_2, off_2 = result.info["infotexts"][1:]
    assert "FreeFuse capture step: 1" in on_1 and "FreeFuse capture step: 2" in on_2
    assert "FreeFuse" not in off_1 and "FreeFuse" not in off_2
    assert result.images[2].pixels == result.images[4].pixels  # FreeFuse off: the capture step changes nothing
    assert webui.log().count("FreeFuse: masks made") == log + 2


def test_a_subject_weight_axis_sets_the_weight_of_a_lora_without_a_tag(webui):
    a, b = webui.lora_names[:2]
    args = plot_args(webui, ("FreeFuse subject 2 LoRA weight", "0.5, 1.5"))
    result = plot(webui, f"{PROMPT} <lora:{a}:0.8>", args)
    assert len(result.images) == 3
    log = webui.log()
    for weight in ("0.5", "1.5"):
        assert f"FreeFuse: {b} has no tag in the prompt: loaded at weight {weight}" in log


def test_an_invalid_value_stops_the_plot_before_any_cell_naming_the_field(webui):
    made = webui.log().count("FreeFuse: masks made")
    with pytest.raises(AssertionError, match=r"FreeFuse capture block value 1000: capture_block: "):
        plot(webui, tagged(webui), plot_args(webui, ("FreeFuse capture block", "1, 1000")))
    assert webui.log().count("FreeFuse: masks made") == made


def test_a_cell_keeps_no_freefuse_infotext_of_the_cell_before(webui):
    """Forge's own Prompt S/R axis: the first cell lacks "cat" (a warning), the second has it (none)."""
    prompt = tagged(webui, PROMPT.replace("cat", "horse"))
    result = plot(webui, prompt, plot_args(webui, ("Prompt S/R", "horse, cat")))
    horse, cat = result.info["infotexts"][1:]
    assert "FreeFuse warnings" in horse and "FreeFuse warnings" not in cat
    assert "FreeFuse coverage" in cat


def test_a_show_masks_axis_puts_each_true_cells_mask_overlay_in_the_grid(webui):
    """X: FreeFuse show masks False, True: the first cell is the image, the second its mask overlay, the overlay a
    job with "Show masks" adds after the same image (same seed and settings)."""
    args = plot_args(webui, ("FreeFuse show masks", ["False", "True"]))
    result = webui.txt2img(
        tagged(webui), steps=6, seed=77, script_name=XYZ, script_args=args, alwayson_scripts=freefuse(webui)
    )
    assert len(result.images) == 3
    grid, image, overlay = result.images
    assert grid.width >= 2 * image.width
    assert (overlay.width, overlay.height) == (image.width, image.height) == (64, 64)
    assert overlay.pixels != image.pixels
    alone = webui.txt2img(tagged(webui), steps=6, seed=77, alwayson_scripts=freefuse(webui, show_masks=True))
    assert len(alone.images) == 2
    assert alone.images[0].pixels == image.pixels and alone.images[1].pixels == overlay.pixels
    assert "FreeFuse show masks: True" in result.info["infotexts"][2]


def test_a_choice_axis_takes_the_accordions_labels_and_writes_the_stored_values(webui):
    """X: "FreeFuse LoRAs on text tokens" picked by its plain labels from the dropdown (what the page lists), and a
    stored value typed as the API and older grids give it: each cell records the stored value, as the accordion."""
    labels = ["All but on others' words", "None"]
    result = plot(webui, tagged(webui), plot_args(webui, ("FreeFuse LoRAs on text tokens", labels)))
    assert len(result.images) == 3
    paper, none = result.info["infotexts"][1:]
    assert "FreeFuse text loras: all" in paper and "FreeFuse text loras: none" in none, (paper, none)
    assert 'X Values: "All but on others\' words,None"' in result.info["infotexts"][0], result.info["infotexts"][0]
    typed = plot(webui, tagged(webui), plot_args(webui, ("FreeFuse LoRAs on text tokens", ["all"])))
    assert "FreeFuse text loras: all" in typed.info["infotexts"][-1]
