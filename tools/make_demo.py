"""Rebuild the shipped demo pipeline (sampling/demo_assets/flux-demo) from scratch, with a fixed seed.

    python -m tools.make_demo --overwrite --device cuda    # the shipped teacher: about 8 min of teacher training
                                                           # on one H100 (VAE stage: ~12 min on 2 CPU cores)
    python -m tools.make_demo --overwrite                  # CPU only: the same stages, but the teacher's 6000
                                                           # steps of batch 512 take about a day on 2 cores
    python -m tools.make_demo --out /tmp/demo --work /tmp/demo-work --reuse   # resume from saved stages

The shipped teacher came from `--device cuda` with the defaults below (its VAE from a CPU run); a smaller teacher
trains on a CPU in minutes (`--teacher-steps 3000 --teacher-stop 3000 --teacher-batch 32`) but drew
scattered blobs (12% checker adherence), too poor for the distillation demo to mean anything.

Stages (each saved under --work, so --reuse skips the finished ones):
1. the T5 sentencepiece model of the world's captions, and the frozen random-init CLIP / T5 towers;
2. the VAE, trained as an autoencoder on freshly rendered scenes; then the latent shift/scale of the world;
3. the Flux teacher (no guidance embedding), trained with plain flow matching (uniform sigma, v = eps - x0) on
   a fixed set of encoded scenes, with an EMA of its weights (what ships);
4. the pipeline folder, and a quality check of the saved teacher with `distill.evaluate` (no LoRA).
Timings and results are printed and written to --work/log.txt.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread waits for a descheduled
# sibling at every barrier, which made 2 threads 2.5x slower than 1. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distill.demo import models, quality, world
from distill.evaluation import EvalConfig, evaluate, format_table
from model.flux import Flux
from model.text import encode_flux
from model.tokenizers import CLIPTokenizer, T5Tokenizer
from model.vae import AutoEncoder
from sampling.demo import DEMO_FOLDER, DEMO_PROMPTS, T5_LENGTH
from sampling.velocity import FluxVelocity

SEED = 20251022


class Log:
    def __init__(self, path: Path):
        self.path, self.start = path, time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{(time.time() - self.start) / 60:6.2f} min] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def save_weights(module: torch.nn.Module, path: Path) -> None:
    save_file({k: t.detach().contiguous().cpu() for k, t in module.state_dict().items()}, str(path))


def stage(path: Path, reuse: bool, build, train, log: Log):
    """A trained stage: its saved weights (with --reuse, when present) loaded into `build()`, else `train()`'s
    result, saved to `path` for the next --reuse. Either way frozen, in eval mode."""
    if reuse and path.exists():
        model = build()
        model.load_state_dict(load_file(str(path)))
        log(f"{path.stem}: reused")
    else:
        model = train()
        save_weights(model, path)
    return model.eval().requires_grad_(False)


def to_vae(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------- VAE


def train_vae(steps: int, batch: int, log: Log, crop_fraction: float = 0.75, device: str = "cpu") -> AutoEncoder:
    """An autoencoder with a light KL term: sampled latents during training make the decoder tolerant of the small
    errors a generated latent has, and the KL keeps the latent scale bounded.

    The first `crop_fraction` of the steps train on random 32x32 crops (a quarter of the compute; the network is
    convolutional, so edges and colours are learnt the same), the rest on whole images, which fits the GroupNorm
    statistics and the mid-block attention to the real input size.
    """
    torch.manual_seed(SEED + 1)
    vae = AutoEncoder(models.VAE_CONFIG).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED + 1)
    half = world.SIZE // 2
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3, 50)
        images, _, _ = world.sample(SEED + 10_000 + step, batch)  # fresh scenes every step
        x = to_vae(images).to(device)
        if step < crop_fraction * steps:
            top, left = torch.randint(0, half + 1, (2,), generator=gen).tolist()
            x = x[:, :, top:top + half, left:left + half]
        mean, logvar = vae.moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(device)
        rec = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        # L1 as well as MSE: it keeps edges sharp and flat regions exactly on the palette
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = -10 * math.log10(F.mse_loss(rec, x).item() / 4)  # images span 2 units
            log(f"vae step {step:5d}  loss {loss.item():.4f}  psnr {psnr:.1f} dB  kl {kl.item():.2f}")
    return vae.cpu().eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: AutoEncoder, images: np.ndarray, batch: int = 256, device: str = "cpu") -> torch.Tensor:
    """Unscaled latent means (N, 16, 16, 16), on the CPU."""
    vae = copy.deepcopy(vae).to(device)
    return torch.cat([vae.encode(to_vae(images[i:i + batch]).to(device)).cpu() for i in range(0, len(images), batch)])


def with_latent_stats(vae: AutoEncoder, latents: torch.Tensor) -> AutoEncoder:
    """Set the VAE's shift / scale so normalised latents of the world have mean 0 and std 1 (Flux's convention)."""
    shift, std = latents.mean().item(), latents.std().item()
    vae.config = dataclasses.replace(vae.config, shift_factor=round(shift, 4), scale_factor=round(1 / std, 4))
    return vae


# ---------------------------------------------------------------------------------------------- text


@torch.no_grad()
def encode_captions(clip, t5, spiece_path: Path, captions: list[str], batch: int = 512) -> dict[str, torch.Tensor]:
    clip_tok = CLIPTokenizer.load(None)
    t5_tok = T5Tokenizer.load(spiece_path, max_length=T5_LENGTH)
    txt, y = [], []
    for i in range(0, len(captions), batch):
        t, _, p = encode_flux(captions[i:i + batch], clip=clip, clip_tokenizer=clip_tok, t5=t5, t5_tokenizer=t5_tok,
                              max_length=T5_LENGTH)
        txt.append(t)
        y.append(p)
    return {"txt": torch.cat(txt), "y": torch.cat(y)}


# ---------------------------------------------------------------------------------------------- teacher


def adaln_zero_(model: Flux) -> Flux:
    """DiT's adaLN-Zero init: every block starts as the identity (zero shift, scale and gate) and the output layer
    at zero. PyTorch's default init of these layers trained several times slower here."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("_mod.lin", "modulation.lin")) or name in ("final_layer.adaLN_modulation.1",
                                                                        "final_layer.linear"):
                module.weight.zero_()
                module.bias.zero_()
    return model


def train_teacher(x0: torch.Tensor, text: dict[str, torch.Tensor], caption_idx: torch.Tensor, steps: int, batch: int,
                  lr: float, log: Log, ckpt: Path | None = None, device: str = "cpu", stop: int | None = None) -> Flux:
    """Plain flow matching: x = (1 - s) x0 + s eps with s ~ U(0, 1), target eps - x0, MSE. Returns the EMA of the
    weights (decay 0.998 after a short ramp), which samples better than the last iterate.

    Uniform sigma, not logit-normal: the demo samples on schnell's unshifted linear grid, whose first steps sit at
    sigma 1, 0.97, 0.94 ... where the layout is decided. Logit-normal(0, 1) puts 0.16% of its draws above 0.95, and
    a teacher trained that way predicted noise-like textures there and drew scattered blobs at every step count.
    """
    torch.manual_seed(SEED + 2)
    model = adaln_zero_(Flux(models.FLUX_CONFIG)).to(device).train()
    x0, text = x0.to(device), {k: v.to(device) for k, v in text.items()}
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    velocity = FluxVelocity(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(SEED + 3)
    avg = torch.zeros((), device=device)  # smoothed loss, kept on the device: no sync per step
    for step in range(min(steps, stop or steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 200)
        idx = torch.randint(0, x0.shape[0], (batch,), generator=gen)
        x = x0[idx.to(device)]
        cond = {k: v[caption_idx[idx].to(device)] for k, v in text.items()}
        # the draws come from a CPU generator whatever the device, so a run's data order is the same everywhere
        sigma = torch.rand(batch, generator=gen).to(device)
        eps = torch.randn(x.shape, generator=gen).to(device)
        s = sigma[:, None, None, None]
        v = velocity((1 - s) * x + s * eps, sigma, cond)
        loss = F.mse_loss(v, eps - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
            avg = loss.detach() if step == 0 else avg.lerp_(loss.detach(), 0.02)
        if step % 100 == 0 or step == min(steps, stop or steps) - 1:
            log(f"teacher step {step:5d}  loss {avg.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}")
        if ckpt is not None and (step + 1) % 500 == 0:
            save_weights(ema, ckpt)
    return ema.cpu()


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEMO_FOLDER)
    p.add_argument("--work", type=Path, default=Path("/tmp/scfm-make-demo"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--reuse", action="store_true", help="reuse the stages already saved under --work")
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--teacher-steps", type=int, default=9000, help="length of the teacher's lr schedule")
    p.add_argument("--teacher-stop", type=int, default=6000,
                   help="stop after this many steps of that schedule (the shipped teacher: 6000 of 9000)")
    p.add_argument("--teacher-batch", type=int, default=512)
    # 2e-3, not the 1e-3 usual for transformers: at 1e-3 a 0.6 M-parameter version needed > 400 steps to memorise 4
    # scenes (loss 0.38; 0.24 at 4e-3). Batch 512 at 2e-3 beat batch 256 at 1.5e-3 (63.5% against 60.4%).
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--scenes", type=int, default=60_000, help="encoded scenes the teacher trains on")
    p.add_argument("--per-prompt", type=int, default=16, help="noises per prompt in the quality check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="train and check on this device (cuda: minutes instead of the CPU's"
                   " hour; results differ from a CPU run by rounding only)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "log.txt")
    log(f"make_demo: {vars(args)}")

    # 1. tokenizer and text encoders
    images, captions, _ = world.sample(SEED, args.scenes)
    spiece_path = args.work / "spiece.model"
    if args.reuse and spiece_path.exists():
        # sentencepiece's trainer is not stable across its versions (0.2.2 found 64 pieces where another found
        # 53), and the T5's vocabulary, hence its random init, follows from the piece count
        spiece = spiece_path.read_bytes()
    else:
        spiece = models.train_spiece(captions, SEED)
        spiece_path.write_bytes(spiece)
    clip, t5 = models.build_text_encoders(models.spiece_pieces(spiece), SEED)
    log(f"tokenizer: {models.spiece_pieces(spiece)} pieces; text encoders built")

    # 2. VAE
    vae = stage(args.work / "vae.safetensors", args.reuse, lambda: AutoEncoder(models.VAE_CONFIG),
                lambda: train_vae(args.vae_steps, 16, log, device=args.device), log)
    latents = encode_images(vae, images, device=args.device)
    vae = with_latent_stats(vae, latents)
    x0 = vae.normalize_latents(latents)
    rec = quality.decode(vae, x0[:256])
    full = [world.with_mentions(s, world.ATTRIBUTES).caption for s in world.sample(SEED, 256)[2]]
    log(f"vae: shift {vae.config.shift_factor} scale {vae.config.scale_factor}; reconstruction error "
        f"{quality.paired_distance(rec, images[:256]):.4f} (mean |pixel| / 255); checker on reconstructions "
        f"{quality.score(rec, full)['adherence']:.1f}%, on the originals {quality.score(images[:256], full)['adherence']:.1f}%")

    # 3. teacher
    unique = sorted(set(captions))
    # the demo's dataset prompts ship beside the pipeline; a rebuild elsewhere keeps its own copy in --work
    prompts_path = DEMO_PROMPTS if args.out == DEMO_FOLDER else args.work / "prompts.txt"
    prompts_path.write_text("\n".join(unique) + "\n")
    text = encode_captions(clip, t5, spiece_path, unique)
    index = {c: i for i, c in enumerate(unique)}
    caption_idx = torch.tensor([index[c] for c in captions])
    log(f"teacher: {sum(p.numel() for p in Flux(models.FLUX_CONFIG).parameters()):,} parameters, "
        f"{len(unique)} distinct captions")
    teacher = stage(args.work / "teacher.safetensors", args.reuse, lambda: Flux(models.FLUX_CONFIG),
                    lambda: train_teacher(x0, text, caption_idx, args.teacher_steps, args.teacher_batch,
                                          args.teacher_lr, log, ckpt=args.work / "teacher_ckpt.safetensors",
                                          device=args.device, stop=args.teacher_stop), log)

    # 4. the pipeline folder, then the quality check on what was saved
    models.save_pipeline(args.out, transformer=teacher, vae=vae, clip=clip, t5=t5, spiece=spiece,
                         overwrite=args.overwrite)
    log(f"saved {args.out} ({models.folder_size(args.out) / 1e6:.2f} MB)")
    # the teacher alone, loaded back from the saved folder: what ships is what is measured
    result = evaluate(EvalConfig(model=args.out, lora=None, per_prompt=args.per_prompt, seed=SEED + 4,
                                 device=args.device))
    log("\n" + format_table(result["rows"]))
    (args.work / "quality.json").write_text(json.dumps(result["rows"], indent=2))
    from PIL import Image

    Image.fromarray(result["grid"]).save(args.work / "quality_grid.png")
    log(f"done; quality table in {args.work / 'quality.json'}, grid in {args.work / 'quality_grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
