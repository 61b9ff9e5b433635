"""`python -m distill.train`: distil a Flux or SD3.5 model into a few-step sampler with an SCFM LoRA.

    python -m distill.train                    # the built-in demo: distils the shipped tiny teacher on a CPU
    python -m distill.train --config flux-dev-scfm --model FLUX.1-dev/ --data teacher_data/ --output runs/a
    python -m distill.train --config sd35-large-scfm --model sd3.5_large.safetensors --data d/ --output runs/b
    python -m distill.train --config runs/a.toml --resume          # continue from the newest checkpoint
    python -m distill.export runs/a                                # that checkpoint as LoRA files (export.py)
    torchrun --nproc_per_node 8 -m distill.train --config runs/a.toml   # data-parallel, same results

Every config field is also a flag (`--field value`; `--help` lists them with their meaning). The first run
encodes the dataset once into a cache of latents and text embeddings (Flux needs --vae, --clip, --t5,
--t5-tokenizer; SD3.5 --vae, --clip, --clip-g and optionally --t5 with --t5-tokenizer, and also embeds the
empty negative prompt once for its CFG); training itself loads only the transformer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from weights.detect import detect_family
from weights.io import DTYPES, WeightsError, parse_lora

from .config import ConfigError, DistillConfig, add_dataclass_args, build_config
from .data import Cache, DataError, build_cache, file_identity, plan_cache
from .export import export_lora, export_paths
from .lora import set_state_dict
from .sharding import loads_on_cpu
from .trainer import Stopped, Trainer, TrainingError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a TOML file, or a packaged preset name (flux-dev-scfm, sd35-large-scfm)")
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


def resolve_demo(cfg: DistillConfig) -> DistillConfig:
    """model = "demo": the shipped pipeline folder's transformer, VAE and text encoders, and (without --data) a
    dataset the teacher renders into <output>/data first, as the recipe does (scfm-method.md §7)."""
    if cfg.model != "demo":
        return cfg
    from distill.demo.models import DEMO_FOLDER, demo_sources

    try:
        sources = demo_sources()  # the pipeline folder's own parts, as sampling loads them
    except FileNotFoundError:
        raise ConfigError(f"the demo pipeline is missing from {DEMO_FOLDER}; reinstall scfm or rebuild it with "
                          "`python -m tools.make_demo`") from None
    # the vendored CLIP vocabulary stays (the folder's tokenizer/ holds the same one)
    files = {k: str(getattr(sources, k)) for k in ("vae", "clip", "t5", "t5_tokenizer") if not getattr(cfg, k)}
    data = cfg.data or str(Path(cfg.output).expanduser() / "data")
    return dataclasses.replace(cfg, model=str(DEMO_FOLDER), data=data, **files)


def render_demo_data(cfg: DistillConfig) -> None:
    """The demo teacher renders its training set (resumable: make_dataset skips the images already listed)."""
    from distill.demo.models import DEMO_PROMPTS

    from . import make_dataset

    args = make_dataset.build_parser().parse_args([
        "--model", cfg.model, "--prompts", str(DEMO_PROMPTS), "--out", cfg.data, "--images-per-bucket",
        str(cfg.demo_images), "--resolution", str(cfg.resolution), "--max-sequence-length", str(cfg.t5_length),
        "--batch-size", "64", "--seed", str(cfg.seed), "--device", "cpu", "--dtype", "fp32",
        *[arg for spec in cfg.base_loras for arg in ("--lora", spec)]])  # the teacher renders with them
    make_dataset.run(args)


def family_of(cfg: DistillConfig) -> str:
    """"flux" or "sd3": the demo names, else the model's files (config class names, then keys)."""
    if cfg.model in ("tiny", "tiny-sd3"):
        return {"tiny": "flux", "tiny-sd3": "sd3"}[cfg.model]
    if not cfg.model:
        raise ConfigError("no model: pass --model (a Flux or SD3 / SD3.5 transformer file or folder)")
    return detect_family(Path(cfg.model).expanduser())


# What each family's text encoder returns, and the negative prompt embedded once (SD3.5's CFG: the empty one).
COND_NAMES = {"flux": ("txt", "y"), "sd3": ("context", "pooled")}


def cache_key(cfg: DistillConfig, family: str = "flux") -> dict:
    """What the cached tensors depend on besides the images and prompts."""
    names = ("vae", "clip", "t5", "t5_tokenizer", "clip_tokenizer")
    names += ("clip_g", "clip_g_tokenizer") if family == "sd3" else ()  # Flux keys stay as they were
    files = {k: file_identity(getattr(cfg, k)) for k in names}
    return {**files, "t5_length": cfg.t5_length, "resolution": cfg.resolution, "dtype": cfg.dtype}


def _text_encoder(cfg: DistillConfig, device: torch.device, dtype: torch.dtype, family: str):
    from model.text import encode_flux, encode_sd3
    from model.tokenizers import CLIPTokenizer, T5Tokenizer
    from weights.text import load_clip, load_t5

    clip = load_clip(cfg.clip, dtype=dtype, device=device)
    t5 = load_t5(cfg.t5, dtype=dtype, device=device) if cfg.t5 else None
    clip_tok = CLIPTokenizer.load(cfg.clip_tokenizer or None)
    t5_tok = T5Tokenizer.load(cfg.t5_tokenizer, max_length=cfg.t5_length) if cfg.t5 else None
    if family == "flux":
        def encode(prompts):
            txt, _, y = encode_flux(prompts, clip=clip, clip_tokenizer=clip_tok, t5=t5, t5_tokenizer=t5_tok,
                                    max_length=cfg.t5_length)
            return {"txt": txt, "y": y}
        return encode
    from model.tokenizers import _pad_token_of
    from sampling.sd3 import CLIP_G_PAD

    clip_g = load_clip(cfg.clip_g, dtype=dtype, device=device)
    # bigG pads with "!" unless its own tokenizer folder says otherwise, as sampling/sd3.py loads it
    folder = Path(cfg.clip_g_tokenizer).expanduser() if cfg.clip_g_tokenizer else None
    g_tok = CLIPTokenizer.load(folder, pad_token=None if folder and _pad_token_of(folder) else CLIP_G_PAD)

    def encode_3(prompts):
        context, pooled = encode_sd3(prompts, clip_l=clip, clip_l_tokenizer=clip_tok, clip_g=clip_g,
                                     clip_g_tokenizer=g_tok, t5=t5, t5_tokenizer=t5_tok,
                                     max_length=cfg.t5_length)
        return {"context": context, "pooled": pooled}
    return encode_3


def _encoders(cfg: DistillConfig, device: torch.device, family: str = "flux"):
    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32

    def text():
        return _text_encoder(cfg, device, dtype, family)

    def image():
        from model.vae import images_to_vae
        from weights.vae import load_vae

        vae = load_vae(cfg.vae, dtype=dtype, device=device)
        return lambda images: vae.normalize_latents(vae.encode(images_to_vae(images).to(device, dtype)))

    return text, image


def prepare_cache(cfg: DistillConfig, device: torch.device, rank: int, family: str = "flux") -> Cache:
    folder = Path(cfg.cache or Path(cfg.output) / "cache").expanduser()
    needed = {"flux": ("vae", "clip", "t5", "t5_tokenizer"), "sd3": ("vae", "clip", "clip_g")}[family]
    encoders_given = all(getattr(cfg, k) for k in needed)
    if rank == 0:
        if encoders_given:
            if not cfg.data:
                raise DataError("no dataset: pass --data FOLDER")
            if cfg.t5 and not cfg.t5_tokenizer:
                raise DataError("--t5 needs --t5-tokenizer (its spiece.model / tokenizer.json / folder)")
            plan = plan_cache(cfg.data, cache_key(cfg, family), cfg.resolution, cfg.sample_prompts,
                              cond_names=COND_NAMES[family], negative_prompt="" if family == "sd3" else None)
            text, image = _encoders(cfg, device, family)
            build_cache(folder, plan, text, image, dtype=DTYPES[cfg.dtype])
        elif not (folder / "cache.json").exists():
            flags = ", ".join("--" + k.replace("_", "-") for k in needed)
            raise DataError(f"no cache in {folder}: pass {flags} to build it")
    if dist.is_initialized():
        dist.barrier()  # the other ranks open the cache once rank 0 has finished it
    cache = Cache(folder)
    for field in ("t5_length", "resolution"):
        if cache.key.get(field) != getattr(cfg, field):
            raise DataError(f"{folder}: cache built with {field} {cache.key.get(field)}, the config says "
                            f"{getattr(cfg, field)}; use another --cache")
    return cache


def load_model(cfg: DistillConfig, device: torch.device):
    """With fp8 storage the blocks' weights are quantized as they are read: the bf16 model never exists at once."""
    from model.flux import FLUX_CONFIGS, Flux
    from model.mmdit import MMDIT_CONFIGS, MMDiT

    loras = [parse_lora(spec) for spec in cfg.base_loras]  # merged as the weights are read, before fp8
    if cfg.model in ("tiny", "tiny-sd3"):
        from weights.lora_merge import apply_loras

        torch.manual_seed(cfg.seed)  # the test model: random, but the same on every rank
        model = Flux(FLUX_CONFIGS["tiny"]) if cfg.model == "tiny" else MMDiT(MMDIT_CONFIGS["tiny"])
        apply_loras(model, loras, restorable=False)
        return model
    if family_of(cfg) == "sd3":
        from weights.mmdit import load_mmdit

        return load_mmdit(cfg.model, dtype=DTYPES[cfg.dtype], device=device, fp8=cfg.fp8_storage, loras=loras)
    from weights.flux import load_flux

    return load_flux(cfg.model, dtype=DTYPES[cfg.dtype], device=device, fp8=cfg.fp8_storage, loras=loras)


# ----- main -------------------------------------------------------------------------------------------------


def run(cfg: DistillConfig, on_step=None) -> list[Path]:
    device = setup_distributed(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        clash = [p for p in export_paths(cfg).values() if p.exists()]
        if clash and not cfg.resume:
            raise ConfigError(f"{clash[0]} exists; choose another --output (or --resume that run)")
        demo_data = cfg.model == "demo" and not cfg.data
        cfg = resolve_demo(cfg)
        if demo_data and rank == 0:
            render_demo_data(cfg)
        cache = prepare_cache(cfg, device, rank, family_of(cfg))
        if cfg.cache_only:
            return []
        try:
            model = load_model(cfg, torch.device("cpu") if loads_on_cpu(cfg) else device)
        except torch.OutOfMemoryError:
            tip = "" if cfg.fp8_storage else "; --fp8_base stores its blocks in fp8 (Flux-dev 23.7 -> 11.9 GB)"
            raise TrainingError(f"out of GPU memory loading the model{tip}") from None
        trainer = Trainer(cfg, model, cache, device=device, on_step=on_step)
        trainer.run()
        state = set_state_dict(trainer.model, cfg.export_set)  # on every process: a sharded set is gathered
        if rank != 0:
            return []
        return export_lora(trainer.model, cfg, overwrite=cfg.resume, state=state, base_loras=trainer.base_loras)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        # no config and no model: the built-in demo (distill/configs/demo.toml)
        config = args.pop("config") or (None if args.get("model") else "demo")
        cfg = build_config(config, args)
        for path in run(cfg):
            print(path)
    except Stopped as e:  # Ctrl-C or SIGTERM, with a checkpoint written
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, DataError, WeightsError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
