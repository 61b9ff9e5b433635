"""The SCFM training step that bench/train_step.py times, in both designs, and what it runs on: the cases (model,
latent side, text tokens, batch, rank), the model built with random weights and every LoRA set, our step
(distill/scfm.py, each set its own tensors) and the released trainer's (one live LoRA, the EMA sets copied into it
around each no-grad call, peft's layer formula). tests/test_memory_plan.py plans on the same step."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from timing import built_in  # bench/timing.py, beside this file

from distill.ema import EMAConfig, ema_step
from distill.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers, set_tensors, weight_set
from distill.scfm import SCFMConfig, element_generators, sample_draw, scfm_loss
from distill.speed import block_lora_gradients
from model.flux import FLUX_CONFIGS, FluxConfig
from model.flux2 import FLUX2_CONFIGS
from model.fp8 import quantize_linears_
from sampling.velocity import FluxVelocity
from weights.families import family_of, get_family

# name -> (family, config, latent side (x0's: FLUX.2's is already 2x2-patchified), text tokens, batch, rank)
CASES = {
    "small": ("flux", FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=128,
                                 num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(8, 28, 28)), 32, 64, 4, 16),
    # layer widths where the LoRA layer's memory traffic counts, as at full size, still seconds on a CPU
    "wide": ("flux", FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=512,
                                num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(16, 56, 56)), 32, 64, 4, 16),
    "flux-dev": ("flux", FLUX_CONFIGS["flux-dev"], 64, 256, 8, 64),  # 512 px, T5 length 256
    "klein-4b": ("flux2", FLUX2_CONFIGS["klein-4b"], 32, 512, 8, 64),  # 512 px, Qwen3 length 512
    "klein-9b": ("flux2", FLUX2_CONFIGS["klein-9b"], 32, 512, 8, 64),
}
KLEIN_CFG = 3.0  # klein base's baked-in CFG: c + w (c - u), w = g - 1 for its guidance scale g = 4


def px(case: str) -> int:
    """Image side: 16 px per token side in both families (the VAE's 8 x 2x2 patches)."""
    family, cfg, side, *_ = CASES[case]
    return side * 16 // get_family(family).token_side(cfg)


def scfm_for(model) -> SCFMConfig:
    """The trainer's SCFM config: FLUX.1's drawn guidance input; for a CFG family (klein) the CFG baked in."""
    family = family_of(model)
    if family.guidance != "cfg":
        return SCFMConfig()
    return SCFMConfig(guidance_max=None, cfg_scale=KLEIN_CFG, dynamic_shift=family.dynamic_shift)


def velocity_for(model):
    return family_of(model).part("velocity")(model)  # FluxVelocity, Flux2Velocity


def build(case: str, device: torch.device, dtype: torch.dtype, sets: tuple[str, ...], fp8: bool = False):
    """The model, x0, cond and the negative prompt's cond (None unless the family bakes CFG in)."""
    name, cfg, side, tokens, batch, rank = CASES[case]
    family = get_family(name)
    torch.manual_seed(0)
    with built_in(device, dtype):
        model = family.model_class(cfg)  # random weights, built on the device in the training dtype
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if fp8:
        quantize_linears_(model)
    # the teacher is the base model: a zero set, whose LoRA work every call skips (as the trainer runs it)
    inject_lora(model, LoRAConfig(rank=rank, alpha=rank, sets=sets, targets=family.part("lora_targets")),
                torch.Generator().manual_seed(0))
    model.enable_gradient_checkpointing(device.type != "cpu")  # meta counts what the CUDA run does
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, family.latent_channels(cfg), side, side, generator=g).to(device)
    cond = {"txt": torch.randn(batch, tokens, cfg.context_in_dim, generator=g).to(device, dtype)}
    if hasattr(cfg, "vec_in_dim"):  # FLUX.1's pooled CLIP vector; FLUX.2 has none
        cond["y"] = torch.randn(batch, cfg.vec_in_dim, generator=g).to(device, dtype)
    uncond = None  # the trainer's negative: the empty prompt embedded once, a view per element
    if family.guidance == "cfg":
        empty = torch.randn(1, tokens, cfg.context_in_dim, generator=g).to(device, dtype)
        uncond = {"txt": empty.expand(batch, -1, -1)}
    for layer in lora_layers(model).values():  # distinct, non-zero sets so every call does real work
        for name in sets:
            with torch.no_grad():
                layer.lora_up[name].normal_(0, 1e-3)
    return model, x0, cond, uncond


def draw_for(model, x0: torch.Tensor, step: int):
    side = family_of(model).token_side(model.config)  # latent pixels per token side: FLUX.1 2, FLUX.2 1
    tokens = (x0.shape[-2] // side) * (x0.shape[-1] // side)
    return sample_draw(scfm_for(model), element_generators(0, step, range(x0.shape[0])), x0.shape[1:], tokens)


GRADS: list[float] = []  # per step: the share of the blocks' LoRA layers with a non-zero gradient (1)


def note_block_grads(model) -> None:
    got, total = block_lora_gradients(model)  # the trainer's check of compiled runs (distill/speed.py)
    GRADS.append(got / max(total, 1))


def ours(model, x0, cond, opt, step: int, uncond=None) -> torch.Tensor:
    out = scfm_loss(velocity_for(model), model, x0, cond, draw_for(model, x0, step), scfm_for(model), uncond)
    out.loss.backward()
    note_block_grads(model)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 10.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_step(model, EMAConfig(), step + 1)
    return out.loss.detach()


class Swapped:
    """The released design: one live LoRA; other sets are plain tensors copied into it around each call."""

    def __init__(self, model):
        self.live = set_tensors(model, "live")
        # the same starting values as ours' sets; only `live` is ever selected in the forward
        self.store = {name: set_tensors(model, name) for name in ("fast_ema", "slow_ema")}
        self.backup = [t.detach().clone() for t in self.live]

    def load(self, name: str) -> None:
        for dst, src in zip(self.live, self.store[name]):
            dst.data.copy_(src)


def released(model, x0, cond, opt, step: int, swap: Swapped) -> torch.Tensor:
    velocity, draw = FluxVelocity(model), draw_for(model, x0, step)
    dev = x0.device
    sig = draw.sigmas.to(dev, torch.float32)  # (B, 3)
    dt = draw.dt.to(dev, torch.float32)
    sigma = sig[:, 0].view(-1, 1, 1, 1)
    x = ((1 - sigma) * x0 + sigma * draw.noise.to(dev)).to(x0.dtype)
    g = draw.guidance.to(dev)
    teacher = draw.teacher  # on the host: the rows are known without a device sync
    for dst, src in zip(swap.backup, swap.live):
        dst.copy_(src.data)
    with torch.no_grad():
        v0 = torch.empty_like(x)
        for name, rows in (("teacher", teacher.nonzero()[:, 0].to(dev)),
                           ("fast_ema", (~teacher).nonzero()[:, 0].to(dev))):
            if not len(rows):
                continue
            # the teacher (base model) runs with the adapter off; the fast EMA is copied in, in place
            if name == "fast_ema":
                swap.load(name)
            with weight_set(model, "teacher") if name == "teacher" else contextlib.nullcontext():
                part = {k: v[rows] for k, v in cond.items()}
                v0[rows] = velocity(x[rows], sig[rows, 0], part, g[rows]).to(x.dtype)
        x1 = x - dt[:, 0].view(-1, 1, 1, 1) * v0
        swap.load("slow_ema")
        v1 = velocity(x1, sig[:, 1], cond, g)
        travelled = dt[:, 0].view(-1, 1, 1, 1) * v0.float() + dt[:, 1].view(-1, 1, 1, 1) * v1.float()
        target = travelled / draw.big_dt.to(dev, torch.float32).view(-1, 1, 1, 1)
    for dst, src in zip(swap.live, swap.backup):
        dst.data.copy_(src)  # restore the live weights before the student step
    with weight_set(model, "live"):
        pred = velocity(x, sig[:, 0], cond, g)
    loss = (pred.float() - target).pow(2).flatten(1).mean(1).mean()
    loss.backward()
    note_block_grads(model)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 10.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, decay in (("fast_ema", 0.99), ("slow_ema", 0.999)):
            torch._foreach_lerp_(swap.store[name], [t.detach() for t in swap.live], 1 - decay)
    return loss.detach()


def peft_style(self: LoRALinear, x: torch.Tensor, groups, scale: float) -> torch.Tensor:
    """peft's LoRA linear (`result + lora_B(lora_A(x)) * scaling`), one output per slice as diffusers' separate
    q / k / v / mlp modules give; the scale is applied to the narrow tensor, which makes up for the concat."""
    out = F.linear(x, self.weight, self.bias)
    for rows, name in groups:
        if rows is not None:
            raise ValueError("the released design selects one set for the whole batch")
        down, up = self.lora_down[name].to(x.dtype), self.lora_up[name].to(x.dtype)
        h = F.linear(x, down) * scale
        out = out + torch.cat([F.linear(h_i, u_i) for h_i, u_i in
                               zip(h.chunk(len(self.slices), -1), up.split(self.slices))], dim=-1)
    return out
