// javascript/freefuse.js in a minimal fake page: its missing-phrase rule, card names, row filling and warnings.
// `node --test tests/js/freefuse.test.mjs` runs it alone; tests/core/test_activation.py runs it with
// FREEFUSE_CASES_FILE naming a JSON file of [prompt, words, expected] that Python's missing_phrases produced.
import {test} from "node:test";
import assert from "node:assert/strict";
import {readFileSync} from "node:fs";

const SOURCE = readFileSync(new URL("../../javascript/freefuse.js", import.meta.url), "utf8");

/** Run freefuse.js with `globals` (gradioApp, document, ...) in scope; returns its window.FreeFuse. */
function load(globals = {}) {
    const window = {};
    const names = Object.keys(globals);
    new Function("window", ...names, SOURCE)(window, ...names.map((name) => globals[name]));
    return window.FreeFuse;
}

const OWN_CASES = [
    ["a photo of Harry Potter", "harry potter", []],
    ["(harry potter:1.2) in a garden", "harry potter", []],
    ["(harry:1.2) potter", "harry potter", []],
    ["<lora:harry potter:1> a wizard", "harry potter", ["harry potter"]],
    ["anna and bob", "ann", ["ann"]],
    ["harry potter BREAK daiyu lin", "potter daiyu, daiyu lin", ["potter daiyu"]],
    ["李黛玉在花园里", "黛玉", []],
    ["harry_potter", "harry", ["harry"]],
    ["harry", " , ,", []],
];

function cases() {
    const file = process.env.FREEFUSE_CASES_FILE;
    return file ? JSON.parse(readFileSync(file, "utf8")) : OWN_CASES;
}

test("missing phrases: the same answers as lib_freefuse.activation.missing_phrases", () => {
    const {missingPhrases} = load();
    const list = cases();
    assert.ok(list.length > 0);
    for (const [prompt, words, expected] of list) {
        assert.deepEqual(missingPhrases(prompt, words), expected, JSON.stringify([prompt, words]));
    }
});

test("a card's LoRA name: the alias in its onclick, else data-name", () => {
    const {cardLoraName} = load();
    const card = (onclick, name) => ({getAttribute: () => onclick, dataset: {name}});
    const onclick = `cardClicked('txt2img', "<lora:Harry Alias:" + opts.extra_networks_default_multiplier + ">", "", true)`;
    assert.equal(cardLoraName(card(onclick, "harry_v2")), "Harry Alias");
    assert.equal(cardLoraName(card(null, "harry_v2")), "harry_v2");
});

/** A fake page: a prompt and four FreeFuse rows of one tab, found by querySelector("#id"). */
function fakePage(prompt, rows, background = null) {
    const blocks = {};
    const element = (value) => {
        const children = [];
        return {
            value, children, style: {}, hidden: false, textContent: "", events: [],
            dispatchEvent(event) { this.events.push(event.type); },
            appendChild(child) { children.push(child); blocks[child.id] = child; },
            querySelector() { return this.box; },
        };
    };
    const block = (id, value) => {
        blocks[id] = element(value);
        blocks[id].box = element(value);
        return blocks[id].box;
    };
    block("txt2img_prompt", prompt);
    rows.forEach(([lora, words], i) => {
        block(`freefuse-txt2img-lora-${i}`, lora);
        block(`freefuse-txt2img-words-${i}`, words);
        blocks[`freefuse-txt2img-subject-${i}`] = element("");
    });
    blocks["freefuse-txt2img-add-subject"] = element("");
    if (background !== null) block("freefuse-txt2img-background-words", background);
    const root = {querySelector: (selector) => blocks[selector.replace(/^#/, "").replace(/ textarea$/, "")] || null};
    return {blocks, globals: {gradioApp: () => root, document: {createElement: () => element("")}}};
}

test("refresh: a warning element per row, listing only what is missing", () => {
    const page = fakePage("Harry Potter meets <lora:daiyu:1>", [["harry", "harry potter"], ["daiyu", "daiyu lin"],
        ["", ""], ["", ""]]);
    load(page.globals).refresh("txt2img");
    assert.equal(page.blocks["freefuse-txt2img-missing-0"].hidden, true);
    assert.equal(page.blocks["freefuse-txt2img-missing-1"].hidden, false);
    assert.equal(page.blocks["freefuse-txt2img-missing-1"].textContent, "Not in the prompt: daiyu lin");
    assert.equal(page.blocks["freefuse-txt2img-missing-2"].hidden, true);
});

test("refresh: the background words get the same hint, under their own box", () => {
    const rows = [["harry", "harry potter"], ["", ""], ["", ""], ["", ""]];
    let page = fakePage("Harry Potter in a misty forest", rows, "misty forest, night sky");
    load(page.globals).refresh("txt2img");
    assert.equal(page.blocks["freefuse-txt2img-missing-background"].hidden, false);
    assert.equal(page.blocks["freefuse-txt2img-missing-background"].textContent, "Not in the prompt: night sky");
    assert.deepEqual(page.blocks["freefuse-txt2img-background-words"].children.map((c) => c.id),
        ["freefuse-txt2img-missing-background"]);
    page = fakePage("Harry Potter in a misty forest", rows, "misty forest");
    load(page.globals).refresh("txt2img");
    assert.equal(page.blocks["freefuse-txt2img-missing-background"].hidden, true);
    page = fakePage("Harry Potter", rows);  // a page without the box (an older accordion): no hint, no error
    load(page.globals).refresh("txt2img");
    assert.equal(page.blocks["freefuse-txt2img-missing-background"], undefined);
});

test("addLora: the first row without a LoRA, once per LoRA", () => {
    const page = fakePage("", [["harry", ""], ["", "daiyu lin"], ["", ""], ["", ""]]);
    const {addLora} = load(page.globals);
    addLora("txt2img", "daiyu");
    addLora("txt2img", "daiyu");
    addLora("txt2img", "harry");
    const value = (i) => page.blocks[`freefuse-txt2img-lora-${i}`].box.value;
    assert.deepEqual([0, 1, 2, 3].map(value), ["harry", "daiyu", "", ""]);
    assert.deepEqual(page.blocks["freefuse-txt2img-lora-1"].box.events, ["input", "blur"]);
});

test("showRows: two rows, then every row up to the last one holding something; Add subject while rows are left", () => {
    const shown = (page) => [0, 1, 2, 3].map((i) => page.blocks[`freefuse-txt2img-subject-${i}`].style.display !== "none");
    const add = (page) => page.blocks["freefuse-txt2img-add-subject"].style.display !== "none";
    let page = fakePage("", [["", ""], ["", ""], ["", ""], ["", ""]]);
    load(page.globals).refresh("txt2img");
    assert.deepEqual(shown(page), [true, true, false, false]);
    assert.equal(add(page), true);
    page = fakePage("", [["harry", ""], ["", ""], ["", "daiyu lin"], ["", ""]]);
    load(page.globals).refresh("txt2img");
    assert.deepEqual(shown(page), [true, true, true, false]);
    page = fakePage("", [["", ""], ["", ""], ["", ""], ["c", ""]]);
    load(page.globals).refresh("txt2img");
    assert.deepEqual(shown(page), [true, true, true, true]);
    assert.equal(add(page), false);
});
