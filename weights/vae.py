"""`load_vae`: the 16-channel VAE from BFL `ae.safetensors`, an SAI SD3.5 single file, or diffusers AutoencoderKL.

Layouts, told apart by their keys:
- `ldm`: BFL `ae.safetensors` (our parameter names, no key map);
- `sai`: the VAE inside an SD3.5 single file, the same names under `first_stage_model.` (other keys are skipped);
- `comfy`: the VAE inside a ComfyUI all-in-one FLUX.1 file, the same names under `vae.` (ComfyUI's Flux model class
  saves its VAE there, the transformer under `model.diffusion_model.`, the text encoders under `text_encoders.`);
- `diffusers`: `AutoencoderKL` names (`vae/` folder with `config.json`, a pipeline folder, or a file), mapped by
  `weights/keymaps/vae.py`.

The model is built on the meta device, the file's header is checked against it, then tensors are streamed in.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from model.vae import VAE_CONFIGS, AutoEncoder, VAEConfig

from .assign import assign_tensors, check_keys_and_shapes
from .families import transformer_hints
from .io import WeightsError, config_from_metadata, exists
from .keymaps.vae import diffusers_to_ours
from .reader import iter_tensors, read_config_json, read_shapes, weight_files

SAI_PREFIX = "first_stage_model."
COMFY_PREFIX = "vae."
# the layouts that hold ldm (our) names under a prefix, and the prefix
PREFIXED = {"sai": SAI_PREFIX, "comfy": COMFY_PREFIX}

# Keys that show a file is some other model, for a useful "wrong file" message (the transformers' come from
# their families, weights/families).
_NOT_A_VAE = (
    ("transformer_blocks.", "a diffusers transformer"),
    ("encoder.block.", "a T5 encoder"),
    ("text_model.", "a CLIP text encoder"),
    ("lora_", "a LoRA"),
)


# diffusers' classes for our AutoEncoder: FLUX.1 / SD3.5's, and FLUX.2's (32 channels, quant convs, latent statistics)
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
# BatchNorm's step counter beside FLUX.2's running statistics: meaningless for a frozen VAE, never read
_SKIPPED = "bn.num_batches_tracked"


def _resolve(source: Path) -> tuple[list[Path], dict | None]:
    """The weight files and the diffusers config.json (if any) for a file, a vae/ folder or a pipeline folder."""
    if not exists(source):
        raise WeightsError(f"{source}: no such file or folder; pass ae.safetensors, an SD3.5 file or a vae/ folder")
    folder = source if source.is_dir() else source.parent
    if source.is_dir() and (source / "vae").is_dir():  # a diffusers pipeline folder
        folder = source = source / "vae"
    config_json = read_config_json(folder)
    if config_json is not None and config_json.get("_class_name", "AutoencoderKL") not in DIFFUSERS_CLASSES:
        config_json = None  # a config.json for something else sitting next to a single file
    files = weight_files(source) if source.is_dir() else [source]
    return files, config_json


def _detect_layout(keys: set[str], source: Path) -> str:
    if any(k.startswith(SAI_PREFIX) for k in keys):
        return "sai"
    # before the "which other model is this" hints below: an all-in-one FLUX.1 file also holds the transformer
    comfy_down = COMFY_PREFIX + "encoder.down."
    if COMFY_PREFIX + "encoder.conv_in.weight" in keys and any(k.startswith(comfy_down) for k in keys):
        return "comfy"
    if "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down.") for k in keys):
        return "ldm"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    for marker, what in (*transformer_hints(), *_NOT_A_VAE):
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            raise WeightsError(f"{source}: this is {what}, not a VAE; pass ae.safetensors or a vae/ folder")
    example = min(keys) if keys else "no keys"
    raise WeightsError(f"{source}: not a VAE checkpoint (no encoder/decoder keys; first key {example!r})")


def _config_from_diffusers(cfg: dict, source: Path) -> VAEConfig:
    flux2 = cfg.get("_class_name") == "AutoencoderKLFlux2"
    if flux2 and tuple(cfg.get("patch_size", (2, 2))) != (2, 2):
        raise WeightsError(f"{source}: an AutoencoderKLFlux2 with patch_size {cfg['patch_size']}; FLUX.2's is (2, 2)")
    if flux2 and not (cfg.get("use_quant_conv", True) and cfg.get("use_post_quant_conv", True)):
        raise WeightsError(f"{source}: an AutoencoderKLFlux2 without its quant convs is not supported")
    if not flux2 and (cfg.get("use_quant_conv", True) or cfg.get("use_post_quant_conv", True)):
        raise WeightsError(f"{source}: an AutoencoderKL with quant convs (SD1/SDXL-style); only the 16-channel "
                           "Flux / SD3.5 VAE is supported")
    if not cfg.get("mid_block_add_attention", True):
        raise WeightsError(f"{source}: an AutoencoderKL without mid-block attention is not supported")
    widths = list(cfg.get("block_out_channels", (64,)))
    ch = widths[0]
    if any(w % ch for w in widths):
        raise WeightsError(f"{source}: block_out_channels {widths} are not multiples of the first; not supported")
    shift = cfg.get("shift_factor")
    try:
        return VAEConfig(
            in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), ch=ch,
            ch_mult=tuple(w // ch for w in widths), num_res_blocks=cfg.get("layers_per_block", 1),
            z_channels=cfg.get("latent_channels", 32 if flux2 else 4), norm_groups=cfg.get("norm_num_groups", 32),
            scale_factor=1.0 if flux2 else cfg.get("scaling_factor", 0.18215),
            shift_factor=0.0 if flux2 or shift is None else shift, quant_conv=flux2,
            batch_norm_eps=cfg.get("batch_norm_eps", 1e-4) if flux2 else None,
        )
    except ValueError as e:
        raise WeightsError(f"{source}: config.json describes an unsupported VAE ({e})") from None


def _config_from_shapes(shapes: dict[str, list[int]], layout: str, source: Path) -> VAEConfig:
    """Infer the architecture from our-named shapes; the latent scale/shift come from the family the layout implies."""
    if layout == "diffusers" and "bn.running_mean" in shapes:  # FLUX.2's: its config.json names its class
        raise WeightsError(f"{source}: a diffusers FLUX.2 VAE file without its config.json; pass the vae/ folder "
                           "holding both with --vae")
    if layout == "diffusers":
        raise WeightsError(f"{source}: a diffusers VAE file without config.json: the Flux (0.3611 / 0.1159) and SD3.5 "
                           "(1.5305 / 0.0609) latent scalings cannot be told apart; pass the vae/ folder holding "
                           "its config.json with --vae")
    try:
        out_ch, in_ch = shapes["encoder.conv_in.weight"][:2]
        levels = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        blocks = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        widths = [shapes[f"encoder.down.{l}.block.0.conv1.weight"][0] for l in range(levels)]
        z = shapes["decoder.conv_in.weight"][1]
        out_channels = shapes["decoder.conv_out.weight"][0]
    except (KeyError, ValueError):
        raise WeightsError(f"{source}: incomplete VAE checkpoint (encoder/decoder keys missing)") from None
    if any(w % out_ch for w in widths):
        raise WeightsError(f"{source}: level widths {widths} are not multiples of {out_ch}; not a supported VAE")
    # BFL's FLUX.2 file has the quant convs and the latent statistics; without, BFL's (and ComfyUI's all-in-one, the
    # VAE under vae.) is FLUX.1's, SAI's SD3.5's
    flux2 = "encoder.quant_conv.weight" in shapes and "bn.running_mean" in shapes
    preset = VAE_CONFIGS["flux2-ae" if flux2 else "sd3.5" if layout == "sai" else "flux1"]
    groups = preset.norm_groups if all(w % preset.norm_groups == 0 for w in widths) else 1
    try:
        return dataclasses.replace(preset, in_channels=in_ch, out_channels=out_channels, ch=out_ch,
                                   ch_mult=tuple(w // out_ch for w in widths), num_res_blocks=blocks, z_channels=z,
                                   norm_groups=groups)
    except ValueError as e:
        raise WeightsError(f"{source}: unsupported VAE shapes ({e})") from None


def load_vae(source: str | Path, *, config: VAEConfig | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> AutoEncoder:
    """Load the FLUX.1 / SD3.5 (16-channel) or FLUX.2 (32-channel) VAE; returns an `AutoEncoder` in eval mode with
    gradients off.

    `config=None` takes the config from the file's metadata, the diffusers config.json, or the shapes (BFL files and
    ComfyUI all-in-one files are Flux, SAI files SD3.5). Raises a one-line `WeightsError` for anything it cannot load.
    """
    source = Path(source)
    files, config_json = _resolve(source)
    header, metadata = read_shapes(files)
    layout = _detect_layout(set(header), source)

    # checkpoint key -> (our key, transform); keys not listed here are not read.
    names: dict[str, tuple[str, object]] = {}
    if layout == "ldm":
        names = {k: (k, None) for k in header if k != _SKIPPED}
    elif layout in PREFIXED:
        prefix = PREFIXED[layout]
        names = {k: (k[len(prefix):], None) for k in header if k.startswith(prefix) and k != prefix + _SKIPPED}
    else:
        levels = 1 + max(int(m.group(1)) for k in header if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        for k in (k for k in header if k != _SKIPPED):
            mapped = diffusers_to_ours(k, levels)
            if mapped is None:
                raise WeightsError(f"{source}: unexpected key {k!r} for the diffusers AutoencoderKL layout; "
                                   "only the 16-channel Flux / SD3.5 VAE (no quant convs) is supported")
            names[k] = mapped

    shapes: dict[str, tuple[int, ...]] = {}
    for k, (ours, transform) in names.items():
        shape = tuple(header[k][0])
        if transform is not None:  # apply the transform to a meta tensor to learn the shape it produces
            shape = tuple(transform(torch.empty(shape, device="meta")).shape)
        shapes[ours] = shape

    if config is None:
        from_metadata = config_from_metadata(metadata)
        if from_metadata is not None and "family" in from_metadata:
            # a transformer's config ({"family", "config"}): an all-in-one file that convert.py merged LoRAs into
            # carries it; the VAE beside that transformer is inferred as in any all-in-one file
            from_metadata = None
        if from_metadata is not None:
            from_metadata = {k: tuple(v) if isinstance(v, list) else v for k, v in from_metadata.items()}
            try:
                config = VAEConfig(**from_metadata)
            except (TypeError, ValueError) as e:
                raise WeightsError(f"{source}: the config stored in the file's metadata is invalid ({e})") from None
        elif config_json is not None and layout == "diffusers":
            config = _config_from_diffusers(config_json, source)
        else:
            config = _config_from_shapes(shapes, layout, source)

    with torch.device("meta"):
        model = AutoEncoder(config)
    check_keys_and_shapes(model, shapes, source=str(source), layout=layout)

    def tensors():
        for k, t in iter_tensors(files, keys=set(names), dtype=dtype):
            ours, transform = names[k]
            yield ours, (transform(t) if transform is not None else t)

    assign_tensors(model, tensors(), dtype=dtype, device=device, source=str(source))
    return model.eval().requires_grad_(False)
