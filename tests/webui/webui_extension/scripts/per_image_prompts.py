"""Test-only AlwaysOn script (the webui fixture links this folder in as a second extension): a different prompt per
image of one batch, which Forge's API cannot send directly.

It does what the Dynamic Prompts extension does: its `process` rewrites `p.all_prompts` after Forge set them up
and before any batch is sampled, so each image of a batch is conditioned on its own prompt and `p.prompts` holds
one prompt per image. Here `{a|b}` in the prompt gives image i the i-th alternative (cycling); a prompt without
`{...|...}` is left alone, so every other test is unaffected.
"""

import re

from modules import scripts

CHOICE = re.compile(r"\{([^{}|]*(?:\|[^{}|]*)+)\}")


def per_image(prompt: str, index: int) -> str:
    return CHOICE.sub(lambda m: m.group(1).split("|")[index % len(m.group(1).split("|"))], prompt)


class PerImagePrompts(scripts.Script):
    def title(self):
        return "FreeFuse test: per-image prompts"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        if CHOICE.search(p.prompt or ""):
            p.all_prompts = [per_image(p.prompt, i) for i in range(len(p.all_prompts))]
