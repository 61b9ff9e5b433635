"""`convert.py lora` writes metadata that describes the written tensors, not the source's: the rank and alpha a
kohya-style loader reads (ss_network_dim / ss_network_alpha) as written in each layout, none where the file holds
no LoRA pair, and no hash of the source's tensors; and it refuses to write, in the diffusers layout, text-encoder
keys that have no diffusers name (diffusers' SD3 loader refused such a file)."""

import copy

import pytest
import torch
from mmdit_fixtures import tiny_diffusers_mmdit
from safetensors.torch import load_file, save_file

from tools.convert import main
from weights.io import read_header
from weights.lora import LoRA, LoRAPart, ModuleLoRA
from weights.lora_write import lora_state_dict

# what the source says of its own tensors (stale once converted) and of its training (kept)
STALE = {"ss_network_dim": "64", "ss_network_alpha": "32", "sshs_model_hash": "0123456789abcdef",
         "sshs_legacy_hash": "01234567", "modelspec.hash_sha256": "0x0123"}
KEPT = {"ss_seed": "7", "ss_training_comment": "a style"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return (code, *capsys.readouterr())


def with_metadata(lora, layout, path):
    """`lora` written in `layout` with the stale and kept keys in its metadata, as another tool would write it."""
    tensors, meta = lora_state_dict(lora, layout)
    save_file(tensors, path, {**meta, **STALE, **KEPT})
    return path


def per_slice_qkv(rank=2, alpha=6.0):
    """A FLUX.1 LoRA of q, k and v as three slices (kohya writes it block-diagonal: rank 3r, alpha 3 alpha)."""
    g = torch.Generator().manual_seed(0)
    parts = [LoRAPart(torch.randn(rank, 3072, generator=g) * 0.3, torch.randn(3072, rank, generator=g) * 0.3, alpha)
             for _ in range(3)]
    return LoRA({"double_blocks.0.img_attn.qkv": ModuleLoRA(parts, (3072,) * 3)}, family="flux", source="random")


@pytest.mark.parametrize("to, dim, alpha, up", [("ours", "2", "6", "double_blocks.0.img_attn.qkv.lora_up"),
                                                ("kohya", "6", "18",
                                                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"),
                                                ("diffusers", "2", "2",
                                                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight")])
def test_the_written_rank_and_alpha_are_those_of_the_written_tensors(tmp_path, capsys, to, dim, alpha, up):
    """Before: the kohya file's block-diagonal layer (rank 6, alpha 18) was said to be rank 2, alpha 6, and every
    output kept the source's sd-scripts / ModelSpec hashes of other tensors."""
    src = with_metadata(per_slice_qkv(), "ours", tmp_path / "src.safetensors")
    out = tmp_path / f"{to}.safetensors"
    assert run(capsys, "lora", src, out, "--to", to, "--family", "flux")[0] == 0
    meta = read_header(out)[1]
    assert load_file(out)[up].shape[1] == int(dim)  # the width the metadata states
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (dim, alpha)
    assert not {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} & meta.keys(), meta
    assert all(meta[k] == v for k, v in KEPT.items())


def test_a_file_without_lora_pairs_states_no_rank_and_text_parts_their_own(tmp_path, capsys):
    """Full differences only: no rank or alpha at all; text-encoder parts only: theirs (rank 2, alpha 1). Before,
    neither file's own keys were written, so the source's 64 / 32 stood in both."""
    diffs = tmp_path / "diffs.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.diff": torch.randn(3072, 3072) * 1e-3,
               "lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.randn(3072) * 1e-3}, diffs, STALE)
    stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    text = tmp_path / "text.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.randn(2, 768), f"{stem}.lora_up.weight": torch.randn(768, 2),
               f"{stem}.alpha": torch.tensor(1.0)}, text, STALE)
    for src, want in ((diffs, {}), (text, {"ss_network_dim": "2", "ss_network_alpha": "1"})):
        out = tmp_path / f"out-{src.name}"
        code, _, err = run(capsys, "lora", src, out, "--to", "kohya", "--family", "flux")
        assert code == 0, err
        meta = read_header(out)[1]
        assert {k: meta[k] for k in ("ss_network_dim", "ss_network_alpha") if k in meta} == want


def test_diffusers_layout_refuses_text_keys_diffusers_cannot_name(tmp_path, capsys):
    """A diffusers file whose CLIP-L part is ComfyUI's (`text_encoders.clip_l.transformer.`, an `.alpha` key): kept
    as they were beside lora_adapter_metadata, diffusers' SD3 loader refused the written file ("Invalid LoRA
    checkpoint"). Now one line pointing to --ignore-te-lora, and that file loads in diffusers."""
    from diffusers import StableDiffusion3Pipeline

    ref = tiny_diffusers_mmdit("sd3.5", sigma=0.2)
    g = torch.Generator().manual_seed(0)
    o, i = ref.transformer_blocks[0].attn.to_q.weight.shape
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    src = tmp_path / "src.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, i, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(o, 2, generator=g),
               f"{clip}.lora_down.weight": torch.randn(2, 768, generator=g),
               f"{clip}.lora_up.weight": torch.randn(768, 2, generator=g), f"{clip}.alpha": torch.tensor(1.0)}, src)
    out = tmp_path / "out.safetensors"
    capsys.readouterr()  # importing diffusers' pipelines says things on stderr
    code, _, err = run(capsys, "lora", src, out, "--to", "diffusers", "--family", "sd3")
    assert code == 2 and err.count("\n") == 1 and "no diffusers name" in err and "--ignore-te-lora" in err, err
    assert not out.exists()
    assert run(capsys, "lora", src, out, "--to", "diffusers", "--family", "sd3", "--ignore-te-lora")[0] == 0
    assert not any("alpha" in k for k in load_file(out))
    parts = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "text_encoder_3", "tokenizer_3"))
    pipe = StableDiffusion3Pipeline(**parts, transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(out))
    assert any("lora_B" in k for k in pipe.transformer.state_dict())
