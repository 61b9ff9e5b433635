"""What a training run needs before its first step: the process group, the built-in demo's files and data, the
dataset cache (latents and text embeddings) and the transformer, loaded for training. `python -m distill.train`
runs them in order; `python -m distill.export` reads a model's architecture through `load_model` on meta.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from sampling.components import component_files, read_model_index
from sampling.demo import DEMO_FOLDER, DEMO_PROMPTS
from sampling.samplers import cfg_scale_from_w
from weights.families import default_family, detect_family, get_family
from weights.family import Family
from weights.io import DTYPES
from weights.lora_merge import lora_spec

from .config import ConfigError, DistillConfig
from .config_files import recipe_cfg_scale
from .data import Cache, build_cache, file_identity, plan_cache
from .dataset import DataError


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


def check_writable(folder: Path, fix: str, need_bytes: int = 4 << 20) -> None:
    """Refuse, before minutes of loading and encoding, a folder the run could never write into: it (or, not made
    yet, its nearest existing parent) must be a folder this user may write, on a disk with `need_bytes` free (a
    lower bound: the demo run writes some 4 MB). Nothing is created. `fix`: the advice ending the one-line
    ConfigError."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{folder}: {existing} is a file, not a folder; {fix}")
    # os.access applies what a write would meet: permissions (root bypasses them) and a read-only file system
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: {existing} is not writable (permissions or a read-only disk); {fix}")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ConfigError(f"{folder}: {free / 1e6:.1f} MB free on its disk, the run needs more than "
                          f"{need_bytes / 1e6:.0f} MB; free some space or {fix}")


def resolve_demo(cfg: DistillConfig) -> DistillConfig:
    """model = "demo": the shipped pipeline folder's transformer, VAE and text encoders, and (without --data) a
    dataset the teacher renders into <output>/data first, as the recipe does (docs/method.md §7)."""
    if cfg.model != "demo":
        return cfg
    from distill.demo.models import demo_sources

    try:
        sources = demo_sources()  # the pipeline folder's own parts, as sampling loads them
    except FileNotFoundError:
        raise ConfigError(f"the demo pipeline is missing from {DEMO_FOLDER}; reinstall scfm or rebuild it with "
                          "`python -m tools.make_demo`") from None
    # the vendored CLIP vocabulary stays (the folder's tokenizer/ holds the same one)
    files = {k: str(getattr(sources, k)) for k in ("vae", "clip", "t5", "t5_tokenizer") if not getattr(cfg, k)}
    data = cfg.data or str(Path(cfg.output).expanduser() / "data")
    return dataclasses.replace(cfg, model=str(DEMO_FOLDER), data=data, **files)


# The parts a family's pipeline sources hold (sampling: FluxSources, SD3Sources, Flux2Sources) by the config field
# that names each. CLIP-L's tokenizer stays the vendored vocabulary (every folder's tokenizer/ holds the same one),
# as resolve_demo keeps it.
SOURCE_FIELDS = {"vae": "vae", "clip": "clip", "clip_l": "clip", "clip_g": "clip_g", "t5": "t5",
                 "clip_g_tokenizer": "clip_g_tokenizer", "t5_tokenizer": "t5_tokenizer", "text_encoder": "qwen",
                 "tokenizer": "qwen_tokenizer"}


def resolve_folder(cfg: DistillConfig, family: Family) -> DistillConfig:
    """model = a diffusers pipeline folder (model_index.json): each part no flag names (VAE, text encoders,
    tokenizers) is the folder's, as the family's pipeline takes it for generate and make_dataset (`from_files`),
    and becomes the run's setting as the flag would (checkpoints record it, so a resume reads it back). A part the
    folder lacks stays unset: a cache built before is used, or prepare_cache names the flag."""
    if _is_test_model(cfg) or not cfg.model:
        return cfg
    model = Path(cfg.model).expanduser()
    if read_model_index(model) is None:  # a file, or a transformer folder: the flags name the parts
        return cfg
    # SD3: the folder's T5 where it lists one; the klein variant does not change where the parts are
    files = component_files(cfg) | {"no_t5": False, "variant": "base"}
    sources = family.part("pipeline").from_files(model, files).sources
    parts = {field: getattr(sources, name) for name, field in SOURCE_FIELDS.items() if hasattr(sources, name)}
    filled = {field: str(path) for field, path in parts.items()
              if path is not None and not getattr(cfg, field) and path.exists()}
    return dataclasses.replace(cfg, **filled) if filled else cfg


def render_demo_data(cfg: DistillConfig) -> None:
    """The demo teacher renders its training set (resumable: make_dataset skips the images already listed)."""
    from . import teacher_data

    args = teacher_data.build_parser().parse_args([
        "--model", cfg.model, "--prompts", str(DEMO_PROMPTS), "--out", cfg.data, "--images-per-bucket",
        str(cfg.demo_images), "--resolution", str(cfg.resolution), "--max-sequence-length", str(cfg.t5_length),
        "--batch-size", "64", "--seed", str(cfg.seed), "--device", "cpu", "--dtype", "fp32",
        *[arg for spec in cfg.lora.base_loras for arg in ("--lora", spec)],  # the teacher renders with them
        *(["--ignore-te-lora"] if cfg.lora.ignore_te_lora and cfg.lora.base_loras else [])])  # alone: refused
    try:
        teacher_data.run(args)
    except ValueError as e:  # make_dataset's one line (its data made with other settings, say), in train's words
        raise ConfigError(in_train_words(str(e), cfg)) from None


# make_dataset's flags by the train flag that sets them for the demo (render_demo_data); --resolution and --seed are
# spelt alike, and the demo fixes the others (--steps, --guidance, --batch-size, ...), which train cannot change
DEMO_FLAGS = {"--out": "--output", "--images-per-bucket": "--demo_images", "--max-sequence-length": "--t5_length",
              "--lora": "--base_loras", "--ignore-te-lora": "--ignore_te_lora"}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def in_train_words(message: str, cfg: DistillConfig) -> str:
    """A make_dataset message met by the demo's rendering, as the train command line says it: train's flags and
    command, and the demo's data folder named by --output (it is <output>/data)."""
    message = message.replace(f"--out {cfg.data}", f"--output {cfg.output}")
    message = message.replace("python -m distill.make_dataset", "python -m distill.train")

    def resume(m: re.Match) -> str:  # "pass --steps 32 to continue it, or ": a flag train has not: the other way
        return m[0] if all(f in DEMO_FLAGS or f in ("--resolution", "--seed") for f in _FLAG.findall(m[1])) else ""

    message = re.sub(r"pass ([^;]*?) to continue it, or ", resume, message)
    message = _FLAG.sub(lambda m: DEMO_FLAGS.get(m[0], m[0]), message)
    return message.replace("use another --output", "choose another --output")


def _is_test_model(cfg: DistillConfig) -> bool:
    """--model tiny (the first family's tiny preset) or tiny-<family>: a random test model, no files."""
    return cfg.model == "tiny" or cfg.model.startswith("tiny-")


def family_of(cfg: DistillConfig) -> Family:
    """The model's family: the test models by name (`_is_test_model`), else from its files (config class names,
    then keys)."""
    if _is_test_model(cfg):
        return get_family(cfg.model.removeprefix("tiny").removeprefix("-") or default_family())
    if not cfg.model:
        raise ConfigError("no model: pass --model (a transformer file or folder of a family scfm knows)")
    return detect_family(Path(cfg.model).expanduser())


RECIPE_TEXT_LENGTH = 256  # the released recipe's T5 tokens (docs/method.md §7)


def with_text_length(cfg: DistillConfig, family: Family, warn: bool = True) -> DistillConfig:
    """t5_length 0 (the default) made the family's: the length every pipeline of the family gives its transformer
    where that is fixed (FLUX.2 [klein]: 512 Qwen3 tokens, pads included: diffusers, BFL and ComfyUI alike), else
    the released recipe's 256. Another length for such a family trains the LoRA on text embeddings its pipelines
    never make (the transformer attends to the pads), so `warn` says so."""
    fixed = family.part("pipeline").pads_text_to
    if cfg.t5_length == 0:
        return dataclasses.replace(cfg, t5_length=fixed or RECIPE_TEXT_LENGTH)
    if warn and fixed and cfg.t5_length != fixed:
        warnings.warn(f"t5_length {cfg.t5_length}: every {family.display} pipeline gives its transformer {fixed} "
                      f"text tokens, so the LoRA would meet other text embeddings than it trained on; drop "
                      f"--t5_length (or pass {fixed})", stacklevel=2)
    return cfg


def with_recipe_cfg(cfg: DistillConfig, family: Family) -> DistillConfig:
    """A run whose cfg_scale no flag, file or resumed run set: its family's packaged recipe's (config_files.
    recipe_cfg_scale), said in one line. A CFG family's LoRA is sampled with CFG (its export records the guidance
    trained with, else generate applies the family's default on top), so it must distil the guided teacher, as
    the recipe does; --cfg_scale 0 still turns it off. Left at 0: the flow-matching objective (no CFG, its own),
    a family without a CFG recipe (FLUX.1), and a step-distilled model, which samples without CFG."""
    if cfg.scfm.objective == "flow_matching":
        return cfg
    w, preset = recipe_cfg_scale(family)
    if not w or step_distilled(cfg, family)[0]:
        return cfg
    warnings.warn(f"cfg_scale {w:g}: no flag or file sets it, so this {family.display} run bakes in its recipe's CFG "
                  f"({preset}: c + {w:g} (c - u), sampled at CFG {cfg_scale_from_w(w):g}); pass --cfg_scale 0 to "
                  "distil the teacher without CFG", stacklevel=2)
    return cfg.replace(cfg_scale=w)


def cache_key(cfg: DistillConfig, family: Family | None = None) -> dict:
    """What the cached tensors depend on besides the images and prompts."""
    family = family or default_family()
    names = ("vae", "clip", "t5", "t5_tokenizer", "clip_tokenizer")
    # a family with CLIP-bigG keys its files too, and one with other encoders theirs (FLUX.1's keys stay as they were)
    names += ("clip_g", "clip_g_tokenizer") if "clip_g" in family.text_encoders else ()
    names += tuple(k for k in family.part("pipeline").needed_files if k not in names)
    files = {k: file_identity(getattr(cfg, k)) for k in names}
    key = {**files, "t5_length": cfg.t5_length, "resolution": cfg.resolution, "dtype": cfg.dtype}
    if cfg.dtype == "fp16" and "t5" in names:  # since 2026-12-05 an fp16 T5 keeps `wo` in fp32, as transformers
        key["t5_wo"] = "fp32"  # does: fp16 embeddings cached before are another model's (other keys keep theirs)
    records = text_lora_records(cfg)
    return key | {"text_loras": records} if records else key  # without them, a cache keeps its old key


def text_lora_records(cfg: DistillConfig) -> list[dict]:
    """The base LoRAs whose text-encoder part goes into the text embeddings (none with ignore_te_lora), recorded
    as the exported LoRA records them (file, scale, sha256), so that a changed stack never reuses a stale cache."""
    from weights.lora_text import has_text_part

    from .run_outputs import base_lora_records

    if cfg.lora.ignore_te_lora:
        return []
    return base_lora_records(tuple(s for s in cfg.lora.base_loras if has_text_part(lora_spec(s)[0])))


def step_distilled(cfg: DistillConfig, family: Family) -> tuple[bool, str]:
    """(whether the model is its family's step-distilled variant, what said so), as its pipeline decides it
    (Pipeline.step_distilled: FLUX.2 [klein] from a pipeline folder's model_index.json, else a klein file's name); a
    pipeline's transformer/ folder asks its pipeline folder. A test model, or a model nothing tells the variant of:
    (False, ""), trained as the base model."""
    if _is_test_model(cfg) or not cfg.model:
        return False, ""
    model = Path(cfg.model).expanduser()
    if model.name == "transformer" and read_model_index(model) is None and read_model_index(model.parent):
        model = model.parent
    return family.part("pipeline").step_distilled(model)


def _text_encoder(cfg: DistillConfig, device: torch.device, dtype: torch.dtype, family: Family):
    """The family pipeline's own text encoder (sampling: `Pipeline.text_encoder`), loaded once for every batch,
    the base LoRAs' text-encoder parts merged as the encoders are read (the transformer takes the rest)."""
    # no T5 file: SD3 without T5; FLUX.2 [klein]: the variant the model is (its text encoder is the same either way)
    variant = "distilled" if step_distilled(cfg, family)[0] else "base"
    files = component_files(cfg) | {"no_t5": not cfg.t5, "variant": variant}
    pipe = family.part("pipeline").from_files(Path(cfg.model).expanduser(), files, device=device, dtype=dtype,
                                              loras=[lora_spec(s) for s in cfg.lora.base_loras],
                                              ignore_te_lora=cfg.lora.ignore_te_lora)
    return pipe.text_encoder(cfg.t5_length)


def _encoders(cfg: DistillConfig, device: torch.device, family: Family):
    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32

    def text():
        return _text_encoder(cfg, device, dtype, family)

    def image():
        from model.vae import images_to_vae
        from weights.vae import load_vae

        vae = load_vae(cfg.vae, dtype=dtype, device=device)
        return lambda images: vae.normalize_latents(vae.encode(images_to_vae(images).to(device, dtype)))

    return text, image


def prepare_cache(cfg: DistillConfig, device: torch.device, rank: int, family: Family | None = None) -> Cache:
    folder = Path(cfg.cache or Path(cfg.output) / "cache").expanduser()
    family = family or default_family()
    cfg = with_text_length(cfg, family, warn=False)  # train.run resolved it already; other callers may not
    needed = ("vae", *family.part("pipeline").needed_files)
    encoders_given = all(getattr(cfg, k) for k in needed)
    if rank == 0:
        if encoders_given:
            if not cfg.data:
                raise DataError("no dataset: pass --data FOLDER")
            if cfg.t5 and not cfg.t5_tokenizer:
                raise DataError("--t5 needs --t5-tokenizer (its spiece.model / tokenizer.json / folder)")
            # a CFG family embeds the empty negative prompt once (SD3.5's baked-in CFG, docs/method.md §5)
            plan = plan_cache(cfg.data, cache_key(cfg, family), cfg.resolution, cfg.sample_prompts,
                              cond_names=family.part("pipeline").cond_names,
                              negative_prompt="" if family.guidance == "cfg" else None, flip=cfg.flip)
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
    if not encoders_given:  # a cache built before (or elsewhere): with encoders, build_cache compared whole keys
        built, wanted = cache.key.get("text_loras") or [], text_lora_records(cfg)
        if built != wanted:
            def names(records):
                return ", ".join(f"{r['file']} @ {r['scale']:g}" for r in records) or "none"
            raise DataError(f"{folder}: its text embeddings were made with the text-encoder parts of "
                            f"{names(built)}, this run's base_loras give {names(wanted)}; use another --cache")
    return cache


def teacher_set(model, path: str, family: Family, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """`--teacher_lora` as a set of this run's LoRA layers (for `distill.lora.load_set`), from a file in any
    layout weights.lora reads (ours, diffusers / PEFT, kohya): each of the file's LoRAs goes into the layer slice
    its rows fall in, its rank zero-padded up to the run's and its up matrix rescaled from the file's alpha / r
    to the run's, so the teacher's delta_W is the file's whatever the layout (ours, same rank and alpha: as is).
    device "meta": every check, on a meta model too, and no set made (train.check_loras, before the cache)."""
    from weights.io import WeightsError
    from weights.lora import read_lora

    from .lora import lora_layers

    flag = f"--teacher_lora {path}"
    try:
        lora = read_lora(Path(path).expanduser(), family=family.name)
    except WeightsError as e:
        raise ConfigError(f"--teacher_lora: {e}") from None
    if lora.family != family.name:
        raise ConfigError(f"{flag}: a LoRA for {get_family(lora.family).title}, this run trains {family.title}; "
                          "pass a teacher LoRA made for this model")
    layers = lora_layers(model)
    extra = sorted(set(lora.modules) - set(layers)) or sorted(lora.diffs)
    if extra or lora.text_encoders:
        what = (f"a LoRA or weight difference on {extra[0]}" + (f" (and {len(extra) - 1} more)" if extra[1:] else "")
                if extra else "text-encoder weights (the cached text embeddings cannot include them)")
        raise ConfigError(f"{flag}: has {what}, which a teacher LoRA set cannot hold (SCFM's LoRA layers are "
                          "distill/lora_targets.py's); merge it into the base with --base_loras instead")
    state = {}
    for name, layer in layers.items():
        down, up = (torch.zeros(t["live"].shape, device=device) for t in (layer.lora_down, layer.lora_up))
        if name in lora.modules:
            _place_teacher(lora.modules[name], layer, down, up, f"{flag}: {name}")
        state[f"{name}.lora_down"], state[f"{name}.lora_up"] = down, up
    return state


def _place_teacher(mod, layer, down: torch.Tensor, up: torch.Tensor, where: str) -> None:
    """Fill one layer's (down, up) from the file's ModuleLoRA (weights/lora.py); see `teacher_set`."""
    shape = [up.shape[0], *down.shape[1:]]
    if list(mod.weight_shape) != shape:
        raise ConfigError(f"{where}: delta_W {list(mod.weight_shape)} in the file, {shape} in this model; a LoRA "
                          "for another model?")
    parts, at = [], 0  # (first row, last row + 1, part) of each slice the file has a LoRA for
    for part, n in zip(mod.parts, mod.rows):
        if part is not None:
            parts.append((at, at + n, part))
        at += n
    at = 0
    for i, n in enumerate(layer.slices):  # slice i: rows [a, b) of up, rows i*r:(i+1)*r of down
        a, b = at, at + n
        at = b
        inside = [(pa, pb, p) for pa, pb, p in parts if pa < b and pb > a]
        if len(inside) == 1 and inside[0][0] <= a and b <= inside[0][1]:  # one LoRA spans it (a dense fused one)
            pa, _, p = inside[0]
            pieces = [(a, p.down, p.up[a - pa:b - pa], p.scale)]
        elif all(a <= pa and pb <= b for pa, pb, _ in inside):  # LoRAs of parts of it: side by side in the rank
            pieces = [(pa, p.down, p.up, p.scale) for pa, _, p in inside]
        else:
            raise ConfigError(f"{where}: the file's LoRA slices {list(mod.rows)} straddle this layer's "
                              f"{list(layer.slices)}, which a LoRA set cannot hold; merge the file into the base "
                              "with --base_loras instead")
        rank = sum(d.shape[0] for _, d, _, _ in pieces)
        if rank > layer.rank:
            raise ConfigError(f"{where}: rank {rank} is above this run's --rank {layer.rank}; train with --rank "
                              f"{rank} or more, or resize the file (python tools/convert.py lora --rank)")
        k = 0
        for row, d, u, scale in pieces:
            r = d.shape[0]
            down[i * layer.rank + k:i * layer.rank + k + r] = d.float().to(down.device)
            # delta = scale * u @ d = layer.scale * (u * scale / layer.scale) @ d; 1.0 for our own file
            up[row:row + u.shape[0], k:k + r] = (u.float().reshape(u.shape[0], r, *up.shape[2:]) * (scale / layer.scale)
                                                 ).to(up.device)
            k += r


def load_model(cfg: DistillConfig, device: torch.device, family: Family | None = None):
    """With fp8 storage the blocks' weights are quantized as they are read: the bf16 model never exists at once.
    `family`: the model's, when the caller has already read it (`family_of`), so its files are not read twice."""
    from weights.lora_text import transformer_parts
    from weights.transformer import load_transformer

    family = family or family_of(cfg)
    # merged as the weights are read, before fp8; their text-encoder parts are in the text cache (_text_encoder)
    loras = transformer_parts([lora_spec(spec) for spec in cfg.lora.base_loras], family.name)
    if _is_test_model(cfg):
        from weights.lora_merge import apply_loras

        torch.manual_seed(cfg.seed)  # the test model: random, but the same on every rank
        model = family.model_class(family.config_class.preset("tiny"))
        apply_loras(model, loras, restorable=False)
        return model
    return load_transformer(family, cfg.model, dtype=DTYPES[cfg.dtype], device=device, fp8=cfg.fp8_storage,
                            loras=loras)
