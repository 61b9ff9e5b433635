"""The built-in demo pipeline as sampling sees it: where it ships, and the two settings its teacher was trained
with. `python -m sampling.generate` with no --model samples it; distill/demo builds and describes it (its world of
shapes, its tiny models), and `python -m tools.make_demo` rebuilds these files.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "demo_assets"
DEMO_FOLDER = ASSETS / "flux-demo"  # a diffusers Flux pipeline folder
# The SCFM LoRA distilled from the demo teacher by `python -m distill.train` (README: the shipped run), in the
# diffusers layout a run exports.
DEMO_LORA = ASSETS / "flux-demo-scfm-lora.safetensors"
# Every distinct caption of the teacher's training scenes: the prompts of the demo's teacher-rendered dataset.
DEMO_PROMPTS = ASSETS / "prompts.txt"
T5_LENGTH = 16  # every caption of the world is at most 13 T5 tokens; the teacher is trained at this length
IMAGE_SIZE = 64  # px: with the demo VAE's downscale of 4 and 2x2 packing, 8x8 = 64 image tokens


def demo_lora(spec: str) -> str:
    """A `--lora` spec with 'demo' (optionally 'demo:SCALE') standing for the shipped SCFM LoRA's path."""
    return str(DEMO_LORA) + spec[4:] if spec == "demo" or spec.startswith("demo:") else spec
