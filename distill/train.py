"""`python -m distill.train`: distil a Flux model into a few-step sampler with an SCFM LoRA.

    python -m distill.train --config flux-dev-scfm --model FLUX.1-dev/ --data teacher_data/ --output runs/a
    python -m distill.train --config runs/a.toml --resume          # continue from the newest checkpoint
    torchrun --nproc_per_node 8 -m distill.train --config runs/a.toml   # data-parallel, same results

Every config field is also a flag (`--field value`; `--help` lists them with their meaning). The first run
encodes the dataset once into a cache of latents and text embeddings (needs --vae, --clip, --t5,
--t5-tokenizer); training itself loads only the transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from weights.io import WeightsError

from .config import ConfigError, DistillConfig, add_dataclass_args, build_config
from .data import Cache, DataError, build_cache, file_identity, plan_cache
from .lora import lora_layers, set_state_dict
from .trainer import DTYPES, Trainer, TrainingError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a TOML file, or a packaged preset name (flux-dev-scfm)")
    add_dataclass_args(p.add_argument_group("config fields (override the file)"), DistillConfig)
    return p


# ----- setup ------------------------------------------------------------------------------------------------


def setup_distributed(cfg: DistillConfig) -> torch.device:
    """torchrun sets WORLD_SIZE / LOCAL_RANK: one process per GPU (NCCL), or gloo on CPU."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def cache_key(cfg: DistillConfig) -> dict:
    """What the cached tensors depend on besides the images and prompts."""
    names = ("vae", "clip", "t5", "t5_tokenizer", "clip_tokenizer")
    files = {k: file_identity(getattr(cfg, k)) for k in names}
    return {**files, "t5_length": cfg.t5_length, "resolution": cfg.resolution, "dtype": cfg.dtype}


def _encoders(cfg: DistillConfig, device: torch.device):
    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32

    def text():
        from model.text import encode_flux
        from model.tokenizers import CLIPTokenizer, T5Tokenizer
        from weights.text import load_clip, load_t5

        clip = load_clip(cfg.clip, dtype=dtype, device=device)
        t5 = load_t5(cfg.t5, dtype=dtype, device=device)
        clip_tok = CLIPTokenizer.load(cfg.clip_tokenizer or None)
        t5_tok = T5Tokenizer.load(cfg.t5_tokenizer, max_length=cfg.t5_length)

        def encode(prompts):
            txt, _, y = encode_flux(prompts, clip=clip, clip_tokenizer=clip_tok, t5=t5, t5_tokenizer=t5_tok,
                                    max_length=cfg.t5_length)
            return {"txt": txt, "y": y}
        return encode

    def image():
        from model.vae import images_to_vae
        from weights.vae import load_vae

        vae = load_vae(cfg.vae, dtype=dtype, device=device)
        return lambda images: vae.normalize_latents(vae.encode(images_to_vae(images).to(device, dtype)))

    return text, image


def prepare_cache(cfg: DistillConfig, device: torch.device, rank: int) -> Cache:
    folder = Path(cfg.cache or Path(cfg.output) / "cache").expanduser()
    encoders_given = all((cfg.vae, cfg.clip, cfg.t5, cfg.t5_tokenizer))
    if rank == 0:
        if encoders_given:
            if not cfg.data:
                raise DataError("no dataset: pass --data FOLDER")
            plan = plan_cache(cfg.data, cache_key(cfg), cfg.resolution, cfg.sample_prompts)
            text, image = _encoders(cfg, device)
            build_cache(folder, plan, text, image, dtype=DTYPES[cfg.dtype])
        elif not (folder / "cache.json").exists():
            raise DataError(f"no cache in {folder}: pass --vae, --clip, --t5 and --t5-tokenizer to build it")
    if dist.is_initialized():
        dist.barrier()  # the other ranks open the cache once rank 0 has finished it
    cache = Cache(folder)
    for field in ("t5_length", "resolution"):
        if cache.key.get(field) != getattr(cfg, field):
            raise DataError(f"{folder}: cache built with {field} {cache.key.get(field)}, the config says "
                            f"{getattr(cfg, field)}; use another --cache")
    return cache


def load_model(cfg: DistillConfig, device: torch.device):
    from model.flux import FLUX_CONFIGS, Flux

    if cfg.model == "tiny":
        torch.manual_seed(cfg.seed)  # the demo model: random, but the same on every rank
        return Flux(FLUX_CONFIGS["tiny"])
    if not cfg.model:
        raise ConfigError("no model: pass --model (a Flux transformer file or folder)")
    from weights.flux import load_flux

    return load_flux(cfg.model, dtype=DTYPES[cfg.dtype], device=device)


# ----- export -----------------------------------------------------------------------------------------------


def export_paths(cfg: DistillConfig) -> dict[str, Path]:
    out = Path(cfg.output).expanduser()
    return {fmt: out / f"scfm-lora-{cfg.export_set}{'' if fmt == 'ours' else '-' + fmt}.safetensors"
            for fmt in cfg.export_formats}


def lora_metadata(cfg: DistillConfig, model) -> dict[str, str]:
    """How the LoRA was made (the layout's own metadata adds rank, alpha, targets and sampling hints)."""
    return {"scfm_training": json.dumps({"set": cfg.export_set, "steps": cfg.steps, "t_skip": cfg.t_skip,
                                         "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                                         "base": model.config.to_dict()})}


def export_lora(model, cfg: DistillConfig, *, overwrite: bool = False) -> list[Path]:
    """The chosen set in each requested layout, through the LoRA file code (weights/lora.py)."""
    from weights.lora import Recommended, save_lora

    state = {k: v.float() for k, v in set_state_dict(model, cfg.export_set).items()}
    slices = {name: layer.slices for name, layer in lora_layers(model).items()}
    # scfm-method.md §8: a few Euler steps on the SCFM grid at shift ~3; the T5 length it was distilled with
    hints = Recommended(steps=cfg.sample_steps, schedule="scfm", shift=cfg.sample_shift,
                        guidance=cfg.sample_guidance if model.config.guidance_embed else None,
                        max_sequence_length=cfg.t5_length)
    return [save_lora(state, path, layout=fmt, alpha=cfg.alpha, rank=cfg.rank, slices=slices,
                      metadata=lora_metadata(cfg, model), recommended=hints, overwrite=overwrite)
            for fmt, path in export_paths(cfg).items()]


# ----- main -------------------------------------------------------------------------------------------------


def run(cfg: DistillConfig, on_step=None) -> list[Path]:
    device = setup_distributed(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        clash = [p for p in export_paths(cfg).values() if p.exists()]
        if clash and not cfg.resume:
            raise ConfigError(f"{clash[0]} exists; choose another --output (or --resume that run)")
        cache = prepare_cache(cfg, device, rank)
        if cfg.cache_only:
            return []
        trainer = Trainer(cfg, load_model(cfg, device), cache, device=device, on_step=on_step)
        trainer.run()
        return export_lora(trainer.model, cfg, overwrite=cfg.resume) if rank == 0 else []
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        cfg = build_config(args.pop("config"), args)
        for path in run(cfg):
            print(path)
    except (ConfigError, DataError, WeightsError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
