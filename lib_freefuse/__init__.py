"""FreeFuse for Stable Diffusion WebUI Forge: multi-subject LoRA fusion via auto masking at test time."""

__version__ = "0.8.0"
