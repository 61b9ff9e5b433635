"""generate's flags, as dataclasses read by the helper that also builds train's (sampling/fields.py): the model
files (which the comparison app, sampling/app.py, and distill.evaluate take too), the generation settings and the
run options (sampling/options.py RunOptions). What each flag's value then means is sampling/job.py's."""

from __future__ import annotations

import argparse
import dataclasses

from .fields import add_dataclass_args, opt
from .options import IGNORE_TE_LORA_HELP, OneLineParser, add_run_options


def parse_layers(text: str) -> tuple[int, ...]:
    """`7,8,9` -> (7, 8, 9); an empty string turns skip-layer guidance off."""
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices such as 7,8,9, got {text!r}")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """generate's model-file flags (the comparison app, sampling/app.py, and evaluate take them too)."""

    model: str | None = opt(None, "diffusers Flux / SD3 pipeline folder, or the transformer file or folder "
                                  "(default: the built-in 64-px demo model, sampling/demo_assets/flux-demo)")
    vae: str | None = opt(None, "VAE file or diffusers vae/ folder (default: the pipeline folder's)")
    clip: str | None = opt(None, "CLIP-L file or folder (default: the pipeline folder's text_encoder/)")
    clip_g: str | None = opt(None, "SD3: CLIP-bigG file or folder (default: the pipeline folder's text_encoder_2/)")
    t5: str | None = opt(None, "T5-XXL file or folder (default: the pipeline folder's text_encoder_2/ (Flux) or "
                               "text_encoder_3/ (SD3))")
    no_t5: bool = opt(False, "SD3: run without T5 (zeros in its place, as diffusers)")
    clip_tokenizer: str | None = opt(None, "CLIP-L tokenizer folder (default: the vendored CLIP vocabulary)")
    clip_g_tokenizer: str | None = opt(None, "SD3: CLIP-bigG tokenizer folder (default: the vendored vocabulary "
                                             "padded with '!')")
    t5_tokenizer: str | None = opt(None, "T5 spiece.model / tokenizer.json / folder")
    qwen: str | None = opt(None, "FLUX.2 [klein]: the Qwen3 text encoder folder or file (default: the pipeline "
                                 "folder's text_encoder/)")
    qwen_tokenizer: str | None = opt(None, "FLUX.2 [klein]: its tokenizer.json or folder (default: the pipeline "
                                           "folder's tokenizer/)")
    variant: str | None = opt(None, "FLUX.2 [klein]: base (real CFG, 50 steps) or distilled (4 steps, no CFG); "
                                    "default: the folder's is_distilled, else the file name (their weights look "
                                    "alike)", choices=("base", "distilled"))
    lora: tuple[str, ...] = opt((), "a LoRA to merge, at SCALE if given, else at the scale its metadata "
                                    "recommends, else 1; repeatable ('demo': the shipped SCFM LoRA of the demo "
                                    "model)", metavar="PATH[:SCALE]", repeat=True)
    ignore_te_lora: bool = opt(False, IGNORE_TE_LORA_HELP)


@dataclasses.dataclass(frozen=True)
class GenerationFlags:
    """generate's generation flags: unset values come from an SCFM LoRA's recommendation, else the family's
    default (generation_config)."""

    from_png: str | None = opt(None, "render again the image this PNG of ours records (prompt, model, LoRAs and "
                                     "every setting, from its scfm chunk); the other generation flags and --lora "
                                     "are refused beside it, the model files and run options are not", metavar="PNG")
    prompt: tuple[str, ...] = opt((), "repeatable", repeat=True)
    prompts_file: str | None = opt(None, "a text file, one prompt per line")
    negative_prompt: str | None = opt(None, "Flux: used with --true-cfg > 1; SD3: the CFG negative (default '')")
    steps: int | None = opt(None, "default 28")
    schedule: str | None = opt(None, "sigma grid: the scheduler's, or SCFM's shifted linspace (default: scfm with "
                                     "an SCFM LoRA, else diffusers)", choices=("diffusers", "scfm"))
    shift: str | None = opt(None, "a fixed shift (e.g. 3) or 'dynamic'; default: the schedule's own")
    guidance: float | None = opt(None, "diffusers' guidance_scale: Flux-dev's guidance embedding (default 3.5); "
                                       "SD3's CFG scale, the same as --cfg (default 7.0)")
    cfg: float | None = opt(None, "real classifier-free guidance, uncond + s (cond - uncond): SD3's guidance "
                                  "scale (default 7.0, <= 1 off); Flux's --true-cfg")
    true_cfg: float | None = opt(None, "Flux: > 1 with --negative-prompt: real CFG (default 1, off)")
    slg_layers: tuple[int, ...] = opt((), "SD3: skip-layer guidance blocks (SD3.5-medium: 7,8,9); needs CFG on",
                                      parse=parse_layers, metavar="I,J,...")
    # None, not SD3's values: a flag given to another family's model is refused (job.py check_family_flags), and
    # SD3's generation_config fills in its defaults
    slg_scale: float | None = opt(None, "SD3: skip-layer guidance scale (default 2.8)")
    slg_start: float | None = opt(None, "SD3: SLG from this fraction of the steps (default 0.01)")
    slg_stop: float | None = opt(None, "SD3: SLG until this fraction of the steps (default 0.2)")
    max_sequence_length: int | None = opt(None, "T5 tokens (default: Flux 512, SD3 256)")
    width: int | None = opt(None, "default 1024 (the demo: 64)")
    height: int | None = opt(None, "default 1024 (the demo: 64)")
    seed: int = opt(0, "the first image's seed (default 0, fixed: a rerun makes the same images; none is drawn "
                       "at random)")
    batch_size: int = opt(1, "images per prompt, seeds seed, seed+1, ... (default 1)")
    # accepted only to be refused in words: klein's image= references (editing) are out of scope, and argparse's
    # "unrecognized arguments" would not say so
    image: tuple[str, ...] = opt((), "", repeat=True, hidden=True)


def add_model_files(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p.add_argument_group("model files"), ModelFiles, defaults=True, spell="-")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """generate's command line (`description`: its --help text)."""
    p = OneLineParser(prog="python -m sampling.generate", description=description,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_files(p)
    gen = p.add_argument_group("generation (unset values: an SCFM LoRA's recommendation, else the family default)")
    add_dataclass_args(gen, GenerationFlags, defaults=True, spell="-")
    run = p.add_argument_group("run")
    add_run_options(run)
    run.add_argument("--out", default="outputs", help="a folder, or a .png path for a single image (default outputs/)")
    run.add_argument("--overwrite", action="store_true", help="replace existing files")
    return p
