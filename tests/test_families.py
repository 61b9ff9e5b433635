"""The family registry (weights/families): a family is its own files plus one record. Outside those files no code
names a family or asks a model's class; the lookups answer by name, by model, by file and by LoRA."""

import ast
from pathlib import Path

import pytest

from model.flux import FLUX_CONFIGS, Flux
from model.mmdit import MMDIT_CONFIGS, MMDiT
from weights.families import (
    article,
    detect_family,
    families,
    family_of,
    get_family,
    lora_family,
    register,
    unregister,
)
from weights.families.flux import FLUX
from weights.families.sd3 import SD3
from weights.io import WeightsError

ROOT = Path(__file__).resolve().parents[1]
FAMILY_FILES = ROOT / "weights" / "families"  # the registry and each family's record


def _sources():
    for room in ("model", "weights", "sampling", "distill", "tools"):
        for path in sorted((ROOT / room).rglob("*.py")):
            if FAMILY_FILES not in path.parents:
                yield path


def test_no_code_outside_the_family_files_branches_on_a_family():
    spellings = {s for f in families() for s in f.spellings}
    classes = {f.model_class.__name__ for f in families()}
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and node.value in spellings:
                found.append(f"{where}: the string {node.value!r}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                named = [n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)]
                named += [n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)]
                found += [f"{where}: {node.func.id}(..., {c})" for c in named if c in classes]
    assert not found, "family knowledge outside weights/families:\n" + "\n".join(found)


def test_the_walk_sees_what_it_should_refuse(tmp_path):
    """The check above is only as good as its walk: the patterns it refuses are found in a sample."""
    sample = 'if family == "sd3":\n    pass\nif isinstance(model, Flux):\n    pass\n'
    tree = ast.parse(sample)
    constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    calls = [n.args[1].id for n in ast.walk(tree) if isinstance(n, ast.Call) and n.func.id == "isinstance"]
    assert "sd3" in constants and calls == ["Flux"]
    assert len(list(_sources())) > 60  # every room is walked


def test_lookups_by_name_model_and_spelling():
    assert get_family("flux") is FLUX and get_family("sd3") is SD3
    assert get_family("mmdit") is SD3  # the spelling checkpoints saved before the registry carry
    assert family_of(Flux(FLUX_CONFIGS["tiny"])) is FLUX and family_of(MMDiT(MMDIT_CONFIGS["tiny"])) is SD3
    with pytest.raises(WeightsError, match="unknown model family 'sd4'; scfm knows flux, sd3, flux2"):
        get_family("sd4")
    with pytest.raises(TypeError, match="not a model of any family"):
        family_of(object())
    assert (article(FLUX.title), article(SD3.title)) == ("a Flux", "an SD3 / SD3.5")


def test_a_spelling_cannot_be_taken_twice():
    from dataclasses import replace

    with pytest.raises(ValueError, match="a spelling of 'sd3' is taken"):
        register(replace(FLUX, name="other", aliases=("mmdit",)))
    assert [f.name for f in families()] == ["flux", "sd3", "flux2"]
    unregister("nothing")  # no such family: nothing happens
    assert [f.name for f in families()] == ["flux", "sd3", "flux2"]


def test_old_checkpoints_spelling_loads(tmp_path):
    """A checkpoint our saver wrote before the registry says "mmdit" in its config metadata: still read."""
    import json

    from safetensors.torch import save_file

    from weights.io import CONFIG_METADATA_KEY
    from weights.transformer import load_mmdit

    model = MMDiT(MMDIT_CONFIGS["tiny"])
    meta = {CONFIG_METADATA_KEY: json.dumps({"family": "mmdit", "config": model.config.to_dict()})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "old.safetensors", meta)
    assert load_mmdit(tmp_path / "old.safetensors", device="meta").config == model.config


def test_lora_family_by_names_width_and_statement():
    flux_names = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"]
    sd3_names = ["joint_blocks.0.x_block.attn.qkv"]
    assert lora_family(flux_names, True) == "flux" and lora_family(sd3_names, True) == "sd3"
    shared = ["transformer_blocks.0.attn.to_q"]  # diffusers calls both families' attention alike
    assert lora_family(shared, False, widths=[2432]) == "sd3"
    assert lora_family(shared, False, hint="sd3") == "sd3" and lora_family(shared, False) == "flux"
    assert lora_family(sd3_names, True, stated="mmdit") == "sd3"
    with pytest.raises(WeightsError, match="a LoRA for sd4"):
        lora_family(sd3_names, True, stated="sd4")


def test_detect_family_refuses_what_no_family_claims(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"encoder.block.0.layer.0.weight": torch.zeros(1)}, tmp_path / "t5.safetensors")
    with pytest.raises(WeightsError, match="not the transformer of any family scfm knows"):
        detect_family(tmp_path / "t5.safetensors")


def test_refusals_a_cli_run_can_meet_name_its_flags_and_files(tmp_path):
    """A generate or train run meets these too, and has no config= or weights.load_* to reach for: each names the
    flag or the file that mends it (Python's loader only after, where Python names the family itself)."""
    import dataclasses
    import json

    import torch
    from safetensors.torch import save_file

    from model.flux2 import FLUX2_CONFIGS, Flux2
    from weights.lora import read_lora
    from weights.transformer import load_flux, save_transformer

    def raw(model, path):  # the weights alone: no stored config, as a file from elsewhere
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return path

    # a head dim no preset's RoPE axes fit: its config.json beside it in a folder is the way, and it works
    cfg = dataclasses.replace(FLUX_CONFIGS["tiny"], num_heads=4, axes_dim=(2, 2, 4))
    folder = tmp_path / "odd"
    folder.mkdir()
    odd = raw(Flux(cfg), folder / "odd.safetensors")
    with pytest.raises(WeightsError) as e:
        load_flux(odd, device="meta")
    assert str(e.value) == f"{odd}: head dim 8 matches no preset's RoPE axes; pass a folder holding the file and " \
                           "its diffusers config.json"
    (folder / "config.json").write_text(json.dumps(FLUX.config_to_diffusers(cfg)))
    assert load_flux(folder, device="meta").config == cfg
    # a file cut short of a key the config is read from
    state = Flux(FLUX_CONFIGS["tiny"]).state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if k != "vector_in.in_layer.weight"},
              tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match=r"\(no 'vector_in.in_layer.weight'\); pass a folder holding the file "
                                           r"and its diffusers config.json$"):
        load_flux(tmp_path / "cut.safetensors", device="meta")
    # text-encoder LoRA tensors beside transformer alphas alone: the command that says what the file holds
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{te}.lora_down.weight": torch.zeros(2, 4), f"{te}.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0), "x.weight": torch.zeros(1)},
              tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"; `python tools/convert.py info .*odd.safetensors` says what it holds$"):
        read_lora(tmp_path / "odd.safetensors")
    # another family's transformer in a folder that names Flux: the file alone is read by its keys
    flux2 = save_transformer(Flux2(FLUX2_CONFIGS["tiny"]), tmp_path / "flux2.safetensors")
    with pytest.raises(WeightsError) as e:
        load_flux(flux2, device="meta")
    assert str(e.value) == f"{flux2}: this is a FLUX.2 transformer, not a Flux transformer; pass that file itself " \
                           "as --model (in Python: weights.load_flux2)"
    assert detect_family(flux2).name == "flux2"
