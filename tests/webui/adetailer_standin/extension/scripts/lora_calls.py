"""Test-only extension for the ADetailer test's webui: a log of the LoRAs Forge loads for each sampling pass.

Forge's LoRA extension (extensions-builtin/sd_forge_lora) loads the prompt's `<lora:...>` tags of each pass with
`networks.load_networks(names, te_multipliers, unet_multipliers, ...)`; this wraps that function (loaded before any
user extension) so that each call appends one JSON line {"names": [...], "unet": [...]} to $FREEFUSE_TEST_LORA_LOG,
then does exactly what it did. Without that variable it changes nothing.
"""

import json
import os

LOG_ENV = "FREEFUSE_TEST_LORA_LOG"

if os.environ.get(LOG_ENV):
    import networks

    if not getattr(networks.load_networks, "freefuse_test_log", False):
        original = networks.load_networks

        def load_networks(names, te_multipliers=None, unet_multipliers=None, *args, **kwargs):
            with open(os.environ[LOG_ENV], "a", encoding="utf-8") as log:
                log.write(json.dumps({"names": list(names), "unet": list(unet_multipliers or [])}) + "\n")
            return original(names, te_multipliers, unet_multipliers, *args, **kwargs)

        load_networks.freefuse_test_log = True
        networks.load_networks = load_networks
