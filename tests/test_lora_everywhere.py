"""Every LoRA file a run or `convert.py lora` writes loads in ComfyUI (its rule re-implemented in
comfyui_lora.py) and in diffusers (`load_lora_weights`, installed) at the strength we apply, for FLUX.1 and
SD3.5: the default export names of every set with alpha != rank, a resized and a bf16 conversion. Key coverage
is also checked at FLUX.1-dev and SD3.5-large shapes on the meta device, so block indices past the tiny
models' are covered."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from comfyui_lora import assert_comfyui_merge_is_ours, key_map, load_lora
from conftest import randomize_
from flux_fixtures import run_diffusers as run_diffusers_flux
from flux_fixtures import run_ours as run_ours_flux
from flux_fixtures import save_as_bfl, tiny_diffusers_flux
from flux_fixtures import tiny_inputs as flux_inputs
from mmdit_fixtures import ours_from
from mmdit_fixtures import run_diffusers as run_diffusers_mmdit
from mmdit_fixtures import run_ours as run_ours_mmdit
from mmdit_fixtures import tiny_inputs as mmdit_inputs
from safetensors.torch import load_file
from test_trainer import config

from distill.lora import FLUX_TARGETS, SD3_TARGETS, LoRAConfig, inject_lora, load_set, set_state_dict
from distill.lora_export import export_lora
from model.flux import FLUX_CONFIGS, Flux
from model.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig
from tools.convert import main as convert
from weights import load_flux
from weights.io import read_header
from weights.lora import LoRA
from weights.lora_merge import apply_loras
from weights.lora_write import lora_state_dict

SETS = ("live", "fast_ema", "slow_ema")  # what --export_set / --set take
RANK, ALPHA = 4, 3.0  # alpha != rank, and alpha / rank not a power of two: folding it rounds
# ComfyUI takes SD3's q / k / v width as 64 * depth, as in every released model: so must this tiny one
SD3_COMFY_TINY = MMDiTConfig(hidden_size=128, num_heads=2, depth=2, adm_in_channels=24, context_in_dim=32,
                             pos_embed_max_size=8, dual_attention_layers=(0,))
SD3_DIFFUSERS_KWARGS = {"sample_size": 16, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                        "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "caption_projection_dim": 128, "pooled_projection_dim": 24, "pos_embed_max_size": 8,
                        "qk_norm": "rms_norm", "dual_attention_layers": (0,)}


def _randomize_sets(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in SETS:
        load_set(model, name, {k: torch.randn(v.shape, generator=g) * 0.2
                               for k, v in set_state_dict(model, name).items()})


def _files(model, family: str, root) -> list:
    """The run's default export of every set, then `convert.py lora` resized to rank 2 and cast to bf16, in
    each layout, from the live set's main file."""
    inject_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, targets=FLUX_TARGETS if family == "flux" else SD3_TARGETS))
    _randomize_sets(model, 1)
    files = []
    for which in SETS:
        cfg = config(root, rank=RANK, alpha=ALPHA, export_set=which, output=str(root / "run"))
        files += export_lora(model, cfg)
    main = root / "run" / "scfm-lora-live.safetensors"
    for layout in ("diffusers", "kohya"):
        for extra, tag in ((["--rank", "2"], "r2"), (["--dtype", "bf16"], "bf16")):
            out = root / f"{tag}-{layout}.safetensors"
            assert convert(["lora", str(main), str(out), "--to", layout, *extra]) == 0
            files.append(out)
    return files


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    ref = tiny_diffusers_flux(sigma=0.2)
    save_as_bfl(ref, root / "base.safetensors")
    model = load_flux(root / "base.safetensors").requires_grad_(False)
    return ref, load_flux(root / "base.safetensors"), _files(model, "flux", root)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("sd3")
    ref = randomize_(SD3Transformer2DModel(**SD3_DIFFUSERS_KWARGS), 0.05, 0).eval()
    model = ours_from(ref, SD3_COMFY_TINY).requires_grad_(False)
    return ref, ours_from(ref, SD3_COMFY_TINY), _files(model, "sd3", root)


def _layout(path) -> str:
    return "diffusers" if "lora_adapter_metadata" in read_header(path)[1] else "kohya"


def _peft_keys(model) -> set[str]:
    from peft.utils import get_peft_model_state_dict

    (adapter,) = model.peft_config
    return set(get_peft_model_state_dict(model, adapter_name=adapter))


def _diffusers_load(pipeline_cls, ref, path):
    """`load_lora_weights` of the family's pipeline on a copy of the tiny transformer (nothing else needed)."""
    names = ["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    if pipeline_cls.__name__.startswith("StableDiffusion3"):
        names += ["text_encoder_3", "tokenizer_3"]
    pipe = pipeline_cls(**dict.fromkeys(names), transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    return pipe.transformer


def _close(ours, theirs) -> None:
    err = (ours - theirs).abs().max()
    assert err <= 1e-5 * theirs.abs().max(), f"{err} vs max |output| {theirs.abs().max()}"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_files_load_in_comfyui_and_diffusers_at_our_strength(family, request):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    ref, plain, files = request.getfixturevalue(family)
    assert [f.name for f in files[:2]] == ["scfm-lora-live.safetensors", "scfm-lora-live-kohya.safetensors"]
    if family == "flux":
        pipeline, inp, run_ours, run_theirs = FluxPipeline, flux_inputs(), run_ours_flux, run_diffusers_flux
    else:
        pipeline, inp = StableDiffusion3Pipeline, mmdit_inputs(SD3_COMFY_TINY)
        run_ours, run_theirs = run_ours_mmdit, run_diffusers_mmdit
    for path in files:
        assert_comfyui_merge_is_ours(plain, family, path)
        if _layout(path) != "diffusers":
            continue
        theirs = _diffusers_load(pipeline, ref, path)
        assert _peft_keys(theirs) == {k.removeprefix("transformer.") for k in load_file(str(path))}, path.name
        ours = copy.deepcopy(plain)
        apply_loras(ours, [path])
        _close(run_ours(ours, inp), run_theirs(theirs, inp))


def test_tool_metadata_names_the_base_and_the_strength(flux):
    _, _, files = flux
    main, kohya = (read_header(f)[1] for f in files[:2])
    for meta in (main, kohya):
        assert meta["modelspec.architecture"] == "flux-1/lora"  # the tiny model: no released FLUX.1 size
        assert meta["modelspec.title"] in ("scfm-lora-live", "scfm-lora-live-kohya")
        assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
        assert meta["ss_network_dim"] == str(RANK) and meta["modelspec.resolution"] == "512x512"
        assert json.loads(meta["scfm_training"])["set"] == "live" and meta["scfm_shift"] == "3.0"
    # what a kohya-style loader applies: alpha / dim; the diffusers file's alpha is folded into its weights
    assert (main["ss_network_alpha"], kohya["ss_network_alpha"]) == (str(RANK), f"{ALPHA:g}")
    assert json.loads(main["lora_adapter_metadata"])["transformer.lora_alpha"] == RANK


# ----- released sizes, on the meta device -------------------------------------------------------------------

FLUX_DEV_DIFFUSERS = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                      "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                      "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
SD35_LARGE_DIFFUSERS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
                        "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                        "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                        "qk_norm": "rms_norm"}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_key_of_a_released_size_lands_in_comfyui_and_diffusers(family):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        if family == "flux":
            model, targets = Flux(FLUX_CONFIGS["flux-dev"]), FLUX_TARGETS
            theirs = FluxTransformer2DModel(**FLUX_DEV_DIFFUSERS)
        else:
            model, targets = MMDiT(MMDIT_CONFIGS["sd3.5-large"]), SD3_TARGETS
            theirs = SD3Transformer2DModel(**SD35_LARGE_DIFFUSERS)
        inject_lora(model, LoRAConfig(rank=1, alpha=ALPHA, targets=targets))
    g = torch.Generator().manual_seed(0)  # real rank-1 tensors at the meta shapes (tens of MB)
    state = {k: torch.randn(v.shape, generator=g) for k, v in set_state_dict(model, "live").items()}
    lora = LoRA.from_set_state(state, ALPHA, family=family)
    weights = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert any(m.startswith(("double_blocks.18.", "single_blocks.37.", "joint_blocks.37.")) for m in lora.modules)
    for layout in ("diffusers", "kohya"):
        tensors, meta = lora_state_dict(lora, layout)
        patches, not_loaded = load_lora(tensors, key_map(family, model.config, weights))
        assert not_loaded == [], (layout, not_loaded[:3])
        targets_hit = set()
        for p in patches:
            name = p.target.key.removeprefix("diffusion_model.")
            w = weights[name]
            rows = p.target.rows[1] if p.target.rows else w.shape[0]
            up, down = p.tensors
            assert (up.shape[0], down[0].numel()) == (rows, w[0].numel()), (layout, name)
            targets_hit.add(name)
        assert targets_hit == {f"{m}.weight" for m in lora.modules}, layout
        if layout == "diffusers":  # every module diffusers' peft config names exists, at the file's shapes
            config = json.loads(meta["lora_adapter_metadata"])
            assert set(config["transformer.target_modules"]) == {
                k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors}
            for key, t in tensors.items():
                module = theirs.get_submodule(key.removeprefix("transformer.").rsplit(".lora_", 1)[0])
                shape = module.weight.shape
                want = (t.shape[0], *shape[1:]) if ".lora_A." in key else (shape[0], t.shape[1])
                assert tuple(t.shape[:len(want)]) == tuple(want), key


# ----- README's sampling settings, in diffusers' own scheduler ----------------------------------------------

# the schedulers shipped with FLUX.1-dev and SD3.5 (scheduler/scheduler_config.json)
FLUX_DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def test_readme_diffusers_settings_sample_the_scfm_grid():
    import re
    from pathlib import Path

    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps as flux_timesteps
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    from sampling.schedules import SCFM_FIRST_SIGMA, ScheduleConfig, get_sigmas

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    kwargs = re.search(r"FlowMatchEulerDiscreteScheduler\.from_config\(pipe\.scheduler\.config, ([^)]*)\)", readme)
    flux_steps, sd3_steps = (int(n) for n in re.findall(r"num_inference_steps=(\d+)", readme)[:2])
    sd3_sigmas = [float(x) for x in re.search(r"sigmas=\[([^\]]*)\]", readme)[1].split(",")]
    base = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER)
    flux = FlowMatchEulerDiscreteScheduler.from_config(base.config, **eval(f"dict({kwargs[1]})"))
    # what FluxPipeline.__call__ does: its own sigmas, and mu from the image length (1024 px: 4096 tokens)
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    flux_timesteps(flux, flux_steps, "cpu", sigmas=np.linspace(1.0, 1 / flux_steps, flux_steps), mu=mu)
    sd3 = FlowMatchEulerDiscreteScheduler.from_config(SD35_SCHEDULER)
    retrieve_timesteps(sd3, sd3_steps, "cpu", sigmas=sd3_sigmas)  # StableDiffusion3Pipeline.__call__'s call
    for scheduler, steps in ((flux, flux_steps), (sd3, sd3_steps)):
        ours = get_sigmas(ScheduleConfig(grid="scfm", shift=3.0), steps)
        theirs = scheduler.sigmas.float()
        assert theirs.shape == ours.shape
        torch.testing.assert_close(theirs[1:], ours[1:], rtol=0, atol=1e-6)
        assert (theirs[0].item(), ours[0].item()) == (1.0, torch.tensor(SCFM_FIRST_SIGMA).item())
