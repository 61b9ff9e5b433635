"""What FLUX.2 [klein] sampling holds on the device, from the configs alone (meta models: nothing is read or run).

    python bench/klein_memory.py

Per model: the transformer's weights in bf16 and with `--fp8` (block Linears in e4m3, model/fp8.py), the Qwen3
encoder as loaded (embeddings and the layers up to the last tap, bf16: weights/text.py load_qwen3), the VAE, and
the pipeline's own activation estimate at each side (Pipeline.activation_bytes, the same number `generate` checks
sizes with). `generate` runs the encoder, frees it, then loads the transformer (sampling/base.py encode), so the
peak is the larger of the two stages; `--blocks-to-swap N` takes a further N blocks' weights off the device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.flux2 import FLUX2_CONFIGS, Flux2  # noqa: E402
from model.fp8 import quantize_linears_  # noqa: E402
from model.qwen3 import QWEN3_CONFIGS, Qwen3TextEncoder  # noqa: E402
from model.vae import VAE_CONFIGS, AutoEncoder  # noqa: E402
from sampling.flux2 import Flux2KleinPipeline, Flux2Sources  # noqa: E402

MODELS = {"klein-4b": "qwen3-4b", "klein-9b": "qwen3-8b"}  # docs/flux2.md §0: each klein's encoder
SIDES = (512, 1024)


def held(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def rows() -> list[dict]:
    out = []
    with torch.device("meta"):
        vae = held(AutoEncoder(VAE_CONFIGS["flux2-ae"]).to(torch.bfloat16))
        for name, encoder in MODELS.items():
            model = Flux2(FLUX2_CONFIGS[name]).to(torch.bfloat16)
            bf16 = held(model)
            quantize_linears_(model)
            qwen = held(Qwen3TextEncoder(QWEN3_CONFIGS[encoder]).to(torch.bfloat16))
            # a card's figures: on the CPU the VAE's attention holds its scores whole (activation_bytes), no GPU does
            pipe = Flux2KleinPipeline(Flux2Sources(transformer=Path("unused")), device="cuda", dtype=torch.bfloat16)
            pipe.transformer_config = lambda name=name: FLUX2_CONFIGS[name]
            pipe.vae_config = lambda: VAE_CONFIGS["flux2-ae"]
            for side in SIDES:
                act = pipe.activation_bytes(1, side, side)
                out.append(dict(model=name, side=side, bf16=bf16, fp8=held(model), qwen=qwen, vae=vae, act=act,
                                peak_bf16=max(qwen, bf16 + vae + act), peak_fp8=max(qwen, held(model) + vae + act)))
    return out


if __name__ == "__main__":
    gb = 1e9
    print("# FLUX.2 [klein] sampling memory from the configs (GB = 1e9 bytes), batch 1, bf16")
    print(f"{'model':<10}{'side':>6}{'DiT bf16':>10}{'DiT fp8':>9}{'Qwen3':>7}{'VAE':>6}{'act':>6}"
          f"{'peak bf16':>11}{'peak --fp8':>12}")
    for r in rows():
        print(f"{r['model']:<10}{r['side']:>6}{r['bf16'] / gb:>10.2f}{r['fp8'] / gb:>9.2f}{r['qwen'] / gb:>7.2f}"
              f"{r['vae'] / gb:>6.2f}{r['act'] / gb:>6.2f}{r['peak_bf16'] / gb:>11.2f}{r['peak_fp8'] / gb:>12.2f}")
