"""Shared test setup. Runs before any test module imports the package."""

import os

import torch

# The Triton interpreter flag is read when @triton.jit decorates a kernel, so it must be set before model.kernels'
# Triton modules are imported, and only where no GPU exists (on a GPU the same tests run the compiled kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: thread hand-offs cost more than they save, and one thread keeps results reproducible.
torch.set_num_threads(1)


def compile_for_gpus(code: str) -> None:
    """Run `code` (triton.compile of a kernel for GPU targets) in a fresh interpreter-free process: a kernel that
    has only run interpreted is checked against the real compiler, with no GPU."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]


def randomize_(module: torch.nn.Module, sigma: float, seed: int = 0) -> torch.nn.Module:
    """Randomise every parameter and persistent buffer (docs/models.md §1): norm scales get 1 + N(0, sigma) so a
    swapped scale/shift or a mis-mapped norm cannot hide behind default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * sigma
            is_norm_scale = t.ndim == 1 and any(s in name for s in ("norm", "scale", "ln_")) and name.endswith(
                ("weight", "scale"))
            t.copy_((1 + noise if is_norm_scale else noise).to(t.dtype))
    return module


def assert_same_bits(got: dict, want: dict) -> None:
    """Two state dicts hold the same keys, dtypes and bits (so -0.0 and 0.0 differ, and NaNs of one code match)."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        bits = (t.reshape(-1).view(torch.uint8) for t in (got[k], v))  # reshape: 0-d tensors (optimizer steps) too
        assert got[k].dtype == v.dtype and torch.equal(*bits), k


def comfy_scaled_fp8(sd: dict, per_row: bool = False) -> tuple[dict, dict]:
    """A ComfyUI-style scaled fp8 file of `sd` -> (its tensors, the weights it stands for). Older style: a scalar
    `scale_weight` per 2-D weight, `scale_input` and the `scaled_fp8` marker; newer: `weight_scale` (here one
    per row) and `input_scale`. Scales are absmax / 448, not powers of two."""
    names = ("weight_scale", "input_scale") if per_row else ("scale_weight", "scale_input")
    out, real = {} if per_row else {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            absmax = v.abs().amax(dim=1, keepdim=True) if per_row else v.abs().amax()
            scale = (absmax / 448).clamp_min(1e-12).float()
            q = (v / scale).to(torch.float8_e4m3fn)
            stem = k[: -len("weight")]
            out |= {k: q, stem + names[0]: scale if per_row else scale.reshape(()),
                    stem + names[1]: torch.ones((), dtype=torch.float32)}
            real[k] = q.float() * scale
        else:
            out[k], real[k] = v, v
    return out, real


def random_lora(model: torch.nn.Module, seed: int = 0, *, rank: int = 2, alpha: float = 8.0, targets=None,
                family: str = "flux", recommended=None):
    """Give `model` distill/ LoRA layers whose live set is random (as if trained), at 0.2 std so every delta is
    visible; returns that set as a LoRA file object (weights/lora.py). `targets` None: the family's default."""
    from distill.lora import FLUX_TARGETS, SD3_TARGETS, LoRAConfig, inject_lora, load_set, set_state_dict
    from weights.lora import LoRA

    targets = targets or {"flux": FLUX_TARGETS, "sd3": SD3_TARGETS}[family]
    config = LoRAConfig(rank=rank, alpha=alpha, targets=targets)
    inject_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    live = set_state_dict(model, "live")
    load_set(model, "live", {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in live.items()})
    return LoRA.from_set_state(set_state_dict(model, "live"), alpha, recommended=recommended, family=family)


def tiny_diffusers_vae(scaling_factor: float, shift_factor: float):
    """A random 16-channel diffusers AutoencoderKL that downscales by 4, with the family's latent scale and
    shift (the tiny pipelines' VAE)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    return randomize_(vae, 0.05, seed=4)
