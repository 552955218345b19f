// FreeFuse in Forge's page: (a) a live hint under each subject's activation words: a half-filled row (a LoRA without
// words, words without a LoRA), else the phrases that are not in the prompt; (b) while the FreeFuse accordion is open,
// a click on a LoRA card puts that LoRA into the first subject row without one (its words come from its metadata, or
// the hint asks for them), and the same hint under the background words; (c) the Lora tab's refresh also refreshes the
// rows' LoRA lists; (d) the dropdowns' empty choice is not listed; (e) two subject rows show at first: "Add subject"
// shows one more, and a row holding a LoRA or words always shows (pasted parameters, Fill from prompt, a card click).
// Element ids match scripts/freefuse.py ui(): freefuse-{tab}, freefuse-{tab}-subject-{i}, freefuse-{tab}-lora-{i},
// freefuse-{tab}-words-{i}, freefuse-{tab}-add-subject, freefuse-{tab}-reread-loras, freefuse-{tab}-background-words;
// this file adds freefuse-{tab}-missing-{i} and freefuse-{tab}-missing-background.
(function() {
    "use strict";

    const TABS = ["txt2img", "img2img"];
    const ROWS = 4; // lib_freefuse.script_values.SUBJECT_ROWS
    const FIRST_ROWS = 2; // rows shown before "Add subject"
    const W = "[\\p{L}\\p{N}_]"; // Python's \w on text
    // The prompt as Forge's T5 engine reads it, as lib_freefuse/activation.py _prompt_pieces builds it:
    const EXTRA_NETWORK = new RegExp("<" + W + "+:[^>]+>", "gu"); // modules/extra_networks.py re_extra_net
    const EMPHASIS = /:\s*[+-]?[.\d]+\s*\)|(?<!\\)[()[\]]/gu; // weights "(x:1.2)" and bare brackets
    const BREAK = new RegExp("\\s*(?<!" + W + ")BREAK(?!" + W + ")\\s*", "u"); // a chunk end: no phrase crosses it
    const BOUNDARY = " \u0000 "; // what lib_freefuse.core.prompt makes of a special piece such as </s>
    const REREAD_DELAY_MS = 3000; // the Lora tab's refresh reads the LoRA folder first; the rows' lists follow
    // lib_freefuse/script_values.py incomplete_rows says the same when such a row is sent:
    const NO_WORDS = "No activation words: this row acts as an ordinary LoRA until you type its subject's words";
    const NO_LORA = "No LoRA: these words bind nothing until you pick one";

    /** 'harry potter, the boy' -> ['harry potter', 'the boy']: as lib_freefuse.core.prompt.split_phrases. */
    function splitPhrases(words) {
        const phrases = words.split(",").map((part) => part.split(/\s+/).filter(Boolean).join(" "));
        return [...new Set(phrases.filter(Boolean))];
    }

    /** Lower-cased prompt text outside <...> tags, emphasis syntax dropped, BREAK made a boundary. */
    function promptText(prompt) {
        const parts = prompt.replace(EXTRA_NETWORK, "").split(BREAK);
        return parts.map((part) => " " + part.replace(EMPHASIS, " ")).join(BOUNDARY).toLowerCase();
    }

    /** A letter or digit of a script that puts spaces between words (not CJK ideographs, kana or hangul). */
    function spaced(char) {
        const code = char.codePointAt(0);
        const cjk = (code >= 0x2E80 && code <= 0x9FFF) || (code >= 0xF900 && code <= 0xFAFF) ||
            (code >= 0xAC00 && code <= 0xD7AF);
        return /[\p{L}\p{N}]/u.test(char) && !cjk;
    }

    /** The phrase's regex: any run of spaces between words, word boundaries where its script has spaces. */
    function phrasePattern(phrase) {
        const words = phrase.toLowerCase().split(/\s+/).filter(Boolean);
        const body = words.map((word) => word.replace(/[\\^$.*+?()[\]{}|/]/g, "\\$&")).join("\\s+");
        const first = Array.from(words[0])[0];
        const last = Array.from(words[words.length - 1]).pop();
        const before = spaced(first) ? "(?<!" + W + ")" : "";
        const after = spaced(last) ? "(?!" + W + ")" : "";
        return new RegExp(before + body + after, "u");
    }

    /** Phrases of `words` found nowhere in the prompt outside its <...> tags (lib_freefuse.activation.missing_phrases). */
    function missingPhrases(prompt, words) {
        const text = promptText(prompt);
        return splitPhrases(words).filter((phrase) => !phrasePattern(phrase).test(text));
    }

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    /** The text box or input inside the Gradio block with this element id. */
    function field(id) {
        const block = app().querySelector("#" + id);
        return block && block.querySelector("textarea, input");
    }

    /** The warning element of row i, created at the end of the words block on first use. */
    function warning(tab, i) {
        return hint(`freefuse-${tab}-missing-${i}`, `freefuse-${tab}-words-${i}`);
    }

    /** The hint element `id`, created at the end of the block `blockId` on first use. */
    function hint(id, blockId) {
        let element = app().querySelector("#" + id);
        const block = app().querySelector("#" + blockId);
        if (!element && block) {
            element = document.createElement("div");
            element.id = id;
            element.className = "freefuse-missing";
            element.style.cssText = "font-size: 0.85em; color: var(--color-accent, #e67e22); margin-top: 4px;";
            element.hidden = true;
            block.appendChild(element);
        }
        return element;
    }

    const lastSeen = {};
    const added = {}; // per tab: how many rows "Add subject" asked for

    /** Show the first rows, every row up to the last one holding something, and those "Add subject" asked for. */
    function showRows(tab, words, loras) {
        let count = Math.max(FIRST_ROWS, added[tab] || 0);
        for (let i = 0; i < ROWS; i++) if (words[i].trim() || loras[i]) count = Math.max(count, i + 1);
        for (let i = 0; i < ROWS; i++) {
            const row = app().querySelector(`#freefuse-${tab}-subject-${i}`);
            const display = i < count ? "" : "none";
            if (row && row.style.display !== display) row.style.display = display;
        }
        const button = app().querySelector(`#freefuse-${tab}-add-subject`);
        const display = count < ROWS ? "" : "none";
        if (button && button.style.display !== display) button.style.display = display;
        return count;
    }

    /** "Add subject": one more row, after those shown. */
    function onAdd(event) {
        const button = event.target.closest && event.target.closest("[id$='-add-subject']");
        const tab = button && TABS.find((name) => button.id === `freefuse-${name}-add-subject`);
        if (!tab) return;
        const shown = [...Array(ROWS).keys()].filter((i) => {
            const row = app().querySelector(`#freefuse-${tab}-subject-${i}`);
            return row && row.style.display !== "none";
        }).length;
        added[tab] = Math.min(ROWS, Math.max(shown, FIRST_ROWS) + 1);
        lastSeen[tab] = null;
        refresh(tab);
    }

    /** Update the tab's warnings when its prompt or a row's words changed since the last look. */
    function refresh(tab) {
        const prompt = app().querySelector(`#${tab}_prompt textarea`);
        if (!prompt) return;
        const words = [];
        const loras = [];
        for (let i = 0; i < ROWS; i++) {
            const box = field(`freefuse-${tab}-words-${i}`);
            const lora = field(`freefuse-${tab}-lora-${i}`);
            words.push(box ? box.value : "");
            loras.push(lora ? lora.value.trim() : "");
        }
        const backgroundBox = field(`freefuse-${tab}-background-words`);
        const background = backgroundBox ? backgroundBox.value : "";
        const seen = JSON.stringify([prompt.value, words, loras, background, added[tab] || 0]);
        if (lastSeen[tab] === seen) return;
        lastSeen[tab] = seen;
        showRows(tab, words, loras);
        words.forEach((text, i) => {
            const element = warning(tab, i);
            if (!element) return;
            const phrases = splitPhrases(text).length > 0;
            const missing = missingPhrases(prompt.value, text);
            let message = missing.length ? "Not in the prompt: " + missing.join(", ") : "";
            if (loras[i] && !phrases) message = NO_WORDS;
            if (!loras[i] && phrases) message = NO_LORA;
            show(element, message);
        });
        const missing = missingPhrases(prompt.value, background);
        const element = hint(`freefuse-${tab}-missing-background`, `freefuse-${tab}-background-words`);
        if (element) show(element, missing.length ? "Not in the prompt: " + missing.join(", ") : "");
    }

    /** Write a hint's message, hidden when empty: only what changed, since every write is a DOM mutation and
     * mutations call onAfterUiUpdate again. */
    function show(element, message) {
        if (element.textContent !== message) element.textContent = message;
        if (element.hidden !== !message) element.hidden = !message;
    }

    function isOpen(tab) {
        const wrap = app().querySelector(`#freefuse-${tab} .label-wrap`);
        return Boolean(wrap && wrap.classList.contains("open"));
    }

    /** The name the card's tag uses (its alias, in the card's onclick), else data-name (the file name). */
    function cardLoraName(card) {
        const match = /<lora:([^:>"'\\]+):/.exec(card.getAttribute("onclick") || "");
        return match ? match[1] : card.dataset.name || "";
    }

    /** Set a Gradio 4 dropdown that allows custom values, as typing and leaving it would. */
    function setDropdown(input, value) {
        input.value = value;
        input.dispatchEvent(new Event("input", {bubbles: true}));
        input.dispatchEvent(new Event("blur"));
    }

    /** Put `name` into the first row without a LoRA, unless a row already has it. */
    function addLora(tab, name) {
        const boxes = [];
        for (let i = 0; i < ROWS; i++) boxes.push(field(`freefuse-${tab}-lora-${i}`));
        if (!name || boxes.some((box) => box && box.value.trim() === name)) return;
        const empty = boxes.find((box) => box && !box.value.trim());
        if (empty) setDropdown(empty, name);
    }

    /** A click on a card of the Lora page: Forge's own onclick inserts the tag; this only adds the row. */
    function onClick(event) {
        const card = event.target.closest && event.target.closest(".card");
        if (!card || event.target.closest(".button-row")) return;
        const tab = TABS.find((name) => card.closest(`#${name}_lora_cards`));
        if (tab && isOpen(tab)) addLora(tab, cardLoraName(card));
    }

    /** The Lora tab's refresh button: once Forge has read the folder again, the rows' lists are read again too. */
    function onRefresh(event) {
        const button = event.target.closest && event.target.closest("[id$='_lora_extra_refresh']");
        const tab = button && TABS.find((name) => button.id === `${name}_lora_extra_refresh`);
        const reread = tab && app().querySelector(`#freefuse-${tab}-reread-loras`);
        if (reread) setTimeout(() => reread.click(), REREAD_DELAY_MS);
    }

    /** The dropdowns' empty choice (there so that an empty row sends ""), kept out of their open lists. */
    function hideEmptyChoice() {
        const style = document.createElement("style");
        style.textContent = "[id^='freefuse-'] ul.options li[aria-label=''] { display: none; }";
        document.head.appendChild(style);
    }

    function onInput(event) {
        const target = event.target;
        for (const tab of TABS) {
            if (target.closest && target.closest(`#${tab}_prompt, #freefuse-${tab}`)) refresh(tab);
        }
    }

    function start() {
        const root = app();
        root.addEventListener("input", onInput);
        root.addEventListener("click", onClick);
        root.addEventListener("click", onRefresh);
        root.addEventListener("click", onAdd);
        hideEmptyChoice();
        // Pasted parameters and server-side updates change values without input events: look again now and then.
        setInterval(() => TABS.forEach(refresh), 1000);
        TABS.forEach(refresh);
    }

    window.FreeFuse = {splitPhrases, promptText, phrasePattern, missingPhrases, refresh, addLora, cardLoraName};
    if (typeof onUiLoaded === "function") onUiLoaded(start);
    if (typeof onAfterUiUpdate === "function") onAfterUiUpdate(() => TABS.forEach(refresh));
})();
