"""tools/convert.py and weights/convert.py: lossless round trips, diffusers loads what we write, LoRA layouts
through diffusers' own loaders, merge == run-time apply, bounded memory of the streaming writer, refusals."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from flux_fixtures import assert_fp32_close, tiny_diffusers_flux, tiny_inputs
from flux_fixtures import run_diffusers as run_diffusers_flux
from flux_fixtures import run_ours as run_ours_flux
from mmdit_fixtures import DIFFUSERS_KWARGS, SD35_TINY, tiny_diffusers_mmdit
from mmdit_fixtures import run_diffusers as run_diffusers_mmdit
from mmdit_fixtures import run_ours as run_ours_mmdit
from mmdit_fixtures import tiny_inputs as mmdit_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.flux import Flux, FluxConfig
from tools.convert import main
from weights import load_flux, load_mmdit, load_vae
from weights.convert import convert_checkpoint
from weights.keymaps import to_official
from weights.keymaps.flux import flux_rules
from weights.keymaps.mmdit import mmdit_rules
from weights.lora import LoRA, LoRAPart, ModuleLoRA, read_lora
from weights.lora_merge import apply_loras
from weights.lora_write import write_lora
from weights.stream import nbytes, write_streaming

ROOT = Path(__file__).resolve().parents[1]


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_file(a, b, prefix=""):
    """Same keys, dtypes, shapes and bits (b's keys may carry `prefix`)."""
    x, y = load_file(a), load_file(b)
    assert {prefix + k for k in x} == set(y)
    for k, t in x.items():
        assert t.dtype == y[prefix + k].dtype and torch.equal(bits(t), bits(y[prefix + k])), k


def run(*argv, capsys=None):
    code = main([str(a) for a in argv])
    return code if capsys is None else (code, *capsys.readouterr())


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(diffusers model, the same weights as a BFL file)."""
    ref = tiny_diffusers_flux(sigma=0.2)
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(dict(to_official(flux_rules(2, 2, True), sd.__getitem__)), path)
    return ref, path


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    """(diffusers model, the same weights as an SAI file with its `model.diffusion_model.` prefix)."""
    ref = tiny_diffusers_mmdit("sd3.5", sigma=0.2)
    path = tmp_path_factory.mktemp("sd35") / "sd35.safetensors"
    rules = mmdit_rules(SD35_TINY.depth, SD35_TINY.dual_attention_layers, True)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file({"model.diffusion_model." + k: v for k, v in to_official(rules, sd.__getitem__)}, path)
    return ref, path


def assert_state_equal(model, ref):
    theirs = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(theirs[k])), k


# ----- checkpoints ------------------------------------------------------------------------------------------


def test_flux_to_diffusers_loads_in_diffusers_and_round_trips_bit_exactly(flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    ref, bfl = flux
    folder, single = tmp_path / "flux-diffusers", tmp_path / "flux-diffusers.safetensors"
    # 100KB shards (below --shard-size's 1MB floor, tests/test_convert_refusals.py) split the tiny model
    convert_checkpoint(bfl, folder, "diffusers", shard_bytes=100_000)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    theirs = FluxTransformer2DModel.from_pretrained(folder)
    assert_state_equal(theirs, ref)
    inp = tiny_inputs()
    assert_fp32_close(run_ours_flux(load_flux(bfl), inp), run_diffusers_flux(theirs, inp))

    assert run("checkpoint", bfl, single, "--to", "diffusers") == 0
    model = FluxTransformer2DModel(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(single), strict=True)
    assert_state_equal(model, ref)

    for i, source in enumerate((folder, single)):
        assert run("checkpoint", source, tmp_path / f"back{i}.safetensors", "--to", "official") == 0
        assert_same_file(bfl, tmp_path / f"back{i}.safetensors")


def test_sd35_sai_to_diffusers_loads_in_diffusers_and_round_trips_bit_exactly(sd35, tmp_path):
    from diffusers import SD3Transformer2DModel

    ref, sai = sd35
    folder, single = tmp_path / "sd35-diffusers", tmp_path / "sd35-diffusers.safetensors"
    assert run("checkpoint", sai, folder, "--to", "diffusers") == 0
    theirs = SD3Transformer2DModel.from_pretrained(folder)
    assert_state_equal(theirs, ref)
    inp = mmdit_inputs(SD35_TINY)
    assert_fp32_close(run_ours_mmdit(load_mmdit(sai), inp), run_diffusers_mmdit(theirs, inp))

    assert run("checkpoint", sai, single, "--to", "diffusers") == 0
    model = SD3Transformer2DModel(**DIFFUSERS_KWARGS["sd3.5"])
    model.load_state_dict(load_file(single), strict=True)
    assert_state_equal(model, ref)
    assert run("checkpoint", folder, tmp_path / "back.safetensors", "--to", "official") == 0
    assert_same_file(sai, tmp_path / "back.safetensors")  # SAI's prefix included


def test_vae_round_trips_and_loads_in_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    ref = randomize_(AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16,
                                   down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=32,
                                   up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                                   use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
                    0.1)
    ref.save_pretrained(tmp_path / "vae")
    assert run("checkpoint", tmp_path / "vae", tmp_path / "ae.safetensors", "--to", "official") == 0
    ours = load_vae(tmp_path / "ae.safetensors")
    assert (ours.config.scale_factor, ours.config.shift_factor) == (1.5305, 0.0609)  # kept in the metadata
    assert run("checkpoint", tmp_path / "ae.safetensors", tmp_path / "vae2", "--to", "diffusers") == 0
    theirs = AutoencoderKL.from_pretrained(tmp_path / "vae2")
    assert_state_equal(theirs, ref)
    # config.json carries the latent scale and shift diffusers' pipelines read (not only our metadata)
    assert (theirs.config.scaling_factor, theirs.config.shift_factor) == (1.5305, 0.0609)
    assert run("checkpoint", tmp_path / "vae2", tmp_path / "ae2.safetensors", "--to", "official") == 0
    assert_same_file(tmp_path / "ae.safetensors", tmp_path / "ae2.safetensors")


def test_dtype_conversion_casts_every_float_tensor(flux, tmp_path):
    _, bfl = flux
    assert run("checkpoint", bfl, tmp_path / "bf16.safetensors", "--to", "official", "--dtype", "bf16") == 0
    a, b = load_file(bfl), load_file(tmp_path / "bf16.safetensors")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)


# ----- LoRAs ------------------------------------------------------------------------------------------------


def random_lora(modules: dict[str, tuple[int, ...]], *, in_features: dict[str, int], rank=2, alpha=6.0,
                seed=0):
    """`modules`: official module -> the row split of its parts (one entry: one dense LoRA over the layer)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for m, rows in modules.items():
        parts = [LoRAPart(torch.randn(rank, in_features[m], generator=g) * 0.3,
                          torch.randn(n, rank, generator=g) * 0.3, alpha) for n in rows]
        mods[m] = ModuleLoRA(parts, tuple(rows))
    return LoRA(mods, source=f"random{seed}")


@pytest.fixture(scope="module")
def flux_lora(flux):
    """Fused q/k/v per slice and dense, linear1 dense, the swapped final adaLN, two embedders."""
    model = load_flux(flux[1])
    layers = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_attn.proj",
              "double_blocks.1.img_mod.lin", "single_blocks.0.linear1", "single_blocks.1.linear2", "img_in",
              "guidance_in.in_layer", "final_layer.adaLN_modulation.1"]
    shapes = {m: model.get_submodule(m).weight.shape for m in layers}
    per_slice = "double_blocks.0.img_attn.qkv"
    split = {m: (s[0] // 3,) * 3 if m == per_slice else (s[0],) for m, s in shapes.items()}
    return random_lora(split, in_features={m: s[1] for m, s in shapes.items()})


def diffusers_with_lora(ref, path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    return pipe.transformer


def ours_with(bfl, loras):
    model = load_flux(bfl)
    apply_loras(model, loras)
    return model


def assert_lora_close(ours, expected):
    # merged (ours) vs unmerged (peft) LoRA in fp32, as in test_lora_files.py (docs/models.md §7.1: 4.8e-7)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * max(1.0, expected.abs().max().item()))


def test_lora_to_diffusers_loads_through_load_lora_weights_and_matches_ours(flux, flux_lora, tmp_path):
    ref, bfl = flux
    write_lora(flux_lora, tmp_path / "ours.safetensors", "ours")
    assert run("lora", tmp_path / "ours.safetensors", tmp_path / "peft.safetensors", "--to", "diffusers") == 0
    inp = tiny_inputs()
    expected = run_diffusers_flux(diffusers_with_lora(ref, tmp_path / "peft.safetensors"), inp)
    assert_lora_close(run_ours_flux(ours_with(bfl, [flux_lora]), inp), expected)
    assert (expected - run_diffusers_flux(ref, inp)).abs().max() > 0.1  # the LoRA really moves the output


def test_lora_to_kohya_warns_loads_in_diffusers_on_block_keys_and_keeps_every_key(flux, flux_lora, tmp_path,
                                                                                  capsys):
    ref, bfl = flux
    write_lora(flux_lora, tmp_path / "ours.safetensors", "ours")
    code, _, err = run("lora", tmp_path / "ours.safetensors", tmp_path / "kohya.safetensors", "--to", "kohya",
                       capsys=capsys)
    assert code == 0 and "warning: 3 LoRA layers (" in err and "diffusers' kohya loader" in err
    back = read_lora(tmp_path / "kohya.safetensors")
    assert back.layout == "kohya" and back.modules.keys() == flux_lora.modules.keys()  # our math: every key
    x = torch.randn(256, 5)
    for m, mod in flux_lora.modules.items():
        k = back.modules[m]
        torch.testing.assert_close(k.delta_times(x[: mod.in_features]), mod.delta_times(x[: mod.in_features]))

    # diffusers' kohya path hard-codes full-size single blocks (docs/models.md §7.3), so the file it reads holds
    # the double-block layers; it drops the embedders and final layer, so those are left out of our side too
    block = ("double_blocks.", "single_blocks.1.linear2")
    kept = LoRA({m: v for m, v in flux_lora.modules.items() if m.startswith(block)}, source="blocks")
    write_lora(kept, tmp_path / "blocks.safetensors", "ours")
    assert run("lora", tmp_path / "blocks.safetensors", tmp_path / "kb.safetensors", "--to", "kohya") == 0
    assert next(iter(load_file(tmp_path / "kb.safetensors"))).startswith("lora_unet_")
    inp = tiny_inputs()
    expected = run_diffusers_flux(diffusers_with_lora(ref, tmp_path / "kb.safetensors"), inp)
    assert_lora_close(run_ours_flux(ours_with(bfl, [kept]), inp), expected)


def test_lora_round_trips_through_every_layout(flux_lora, tmp_path):
    write_lora(flux_lora, tmp_path / "a.safetensors", "ours")
    src = tmp_path / "a.safetensors"
    for i, layout in enumerate(("diffusers", "kohya", "ours")):
        assert run("lora", src, tmp_path / f"{i}.safetensors", "--to", layout) == 0
        src = tmp_path / f"{i}.safetensors"
    x = torch.randn(256, 4)
    final = read_lora(src)
    for m, mod in flux_lora.modules.items():
        torch.testing.assert_close(final.modules[m].delta_times(x[: mod.in_features]),
                                   mod.delta_times(x[: mod.in_features]), rtol=1e-6, atol=1e-6)


# ----- merge ------------------------------------------------------------------------------------------------


def test_merge_equals_applying_at_run_time_in_either_layout(flux, flux_lora, tmp_path):
    _, bfl = flux
    write_lora(flux_lora, tmp_path / "a.safetensors", "ours")
    second = random_lora({"double_blocks.0.img_mlp.0": (128,)}, in_features={"double_blocks.0.img_mlp.0": 32},
                         seed=3)
    write_lora(second, tmp_path / "b.safetensors", "kohya")
    loras = ["--lora", f"{tmp_path / 'a.safetensors'}:0.7", "--lora", tmp_path / "b.safetensors"]
    assert run("merge", "--base", bfl, *loras, "--out", tmp_path / "merged.safetensors") == 0
    expected = ours_with(bfl, [(read_lora(tmp_path / "a.safetensors"), 0.7),
                               (read_lora(tmp_path / "b.safetensors"), 1.0)])
    assert_state_equal(load_flux(tmp_path / "merged.safetensors"), expected)  # bit for bit

    assert run("checkpoint", bfl, tmp_path / "base-d", "--to", "diffusers") == 0
    assert run("merge", "--base", tmp_path / "base-d", *loras, "--out", tmp_path / "merged-d") == 0
    assert (tmp_path / "merged-d" / "config.json").exists()  # the base's layout: a diffusers folder
    assert_state_equal(load_flux(tmp_path / "merged-d"), expected)


# ----- info, refusals, --overwrite --------------------------------------------------------------------------


def test_info_names_each_family_and_layout(flux, sd35, flux_lora, tmp_path, capsys):
    write_lora(flux_lora, tmp_path / "k.safetensors", "kohya")
    run("checkpoint", flux[1], tmp_path / "fd", "--to", "diffusers")
    expected = {flux[1]: ["Flux dev", "layout: official"], tmp_path / "fd": ["Flux dev", "layout: diffusers"],
                sd35[1]: ["SD3.5 (dual attention) MMDiT", "key prefix 'model.diffusion_model.'"],
                tmp_path / "k.safetensors": ["LoRA for flux", "layout: kohya", "rank(s): {2: 11}",
                                             "guidance_in"]}
    capsys.readouterr()
    for path, words in expected.items():
        code, out, _ = run("info", path, capsys=capsys)
        assert code == 0 and all(w in out for w in words), out


def test_refusals_are_one_line_with_exit_code_2(flux, tmp_path, capsys):
    _, bfl = flux
    other = tmp_path / "sd15_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, other)
    sd3_peft = tmp_path / "sd35_peft.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2432),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(2432, 2)}, sd3_peft)
    cases = [(("lora", other, tmp_path / "o.safetensors", "--to", "kohya"), "names no Flux Linear"),
             (("checkpoint", other, tmp_path / "o", "--to", "diffusers"), "a LoRA; convert it with"),
             (("merge", "--base", bfl, "--lora", other, "--out", tmp_path / "o.safetensors"),
              "names no Flux"),
             (("checkpoint", bfl, bfl, "--to", "official", "--overwrite"), "is the input")]
    for argv, message in cases:
        code, out, err = run(*argv, capsys=capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o").exists()
    # no longer refused: an SD3.5-large-width PEFT LoRA converts (its q slice of the fused SAI qkv)
    code, _, err = run("lora", sd3_peft, tmp_path / "sd3.safetensors", "--to", "kohya", capsys=capsys)
    assert code == 0 and "no kohya loader for SD3" in err
    assert read_lora(tmp_path / "sd3.safetensors").family == "sd3"
    written = load_file(tmp_path / "sd3.safetensors")
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in written
    with pytest.raises(SystemExit) as e:  # argparse's own errors also exit 2
        main(["checkpoint", str(bfl), "x", "--to", "kohya"])
    assert e.value.code == 2


def test_existing_outputs_are_kept_without_overwrite(flux, tmp_path, capsys):
    _, bfl = flux
    for out in (tmp_path / "x.safetensors", tmp_path / "folder"):
        out.mkdir() if out.suffix == "" else out.write_bytes(b"keep")
        code, _, err = run("checkpoint", bfl, out, "--to", "diffusers", capsys=capsys)
        assert code == 2 and "--overwrite" in err
        assert run("checkpoint", bfl, out, "--to", "diffusers", "--overwrite") == 0
    assert (tmp_path / "folder" / "config.json").exists()
    assert load_flux(tmp_path / "x.safetensors") is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_help_for_every_subcommand(capsys):
    for cmd in ("info", "checkpoint", "lora", "merge"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and cmd in capsys.readouterr().out


# ----- the streaming writer ---------------------------------------------------------------------------------


def test_stream_writer_output_reads_back_in_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2).bfloat16(),
               "d": torch.tensor(2.5, dtype=torch.float64), "e": torch.zeros(0, 4), "f": torch.tensor([True])}
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_streaming(tmp_path / "s.safetensors", plan, tensors.items(), {"x": "y"})
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata() == {"x": "y"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def big_flux_file(path) -> tuple[int, int]:
    """A Flux of 116 tensors, 177 MB in fp32, the largest (single-block linear1) 7.3 MB: (largest, total)."""
    cfg = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=512,
                     num_heads=4, depth=2, depth_single_blocks=6)
    with torch.device("meta"):
        plan = [(k, torch.float32, tuple(v.shape)) for k, v in Flux(cfg).state_dict().items()]
    write_streaming(path, plan, ((k, torch.full(s, 0.5)) for k, _, s in plan))
    sizes = [nbytes(d, s) for _, d, s in plan]
    return max(sizes), sum(sizes)


# Run in a fresh process that holds nothing else. RssAnon, not RSS: the memory-mapped input counts in RSS
# but is file-backed and reclaimable. A fixed mmap threshold stops glibc from raising it after the first
# large free, so every tensor is its own mapping, returned on free: RssAnon is then exactly what is alive,
# and a conversion cannot hide its allocations in heap memory freed earlier.
MEMORY_SCRIPT = """
import sys, threading, time
sys.path[:0] = [{root!r}]
import torch
from weights import stream
from weights.convert import convert_checkpoint

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

# a tiny conversion first: the plan's meta-tensor ops import half of torch on first use
convert_checkpoint({tiny!r}, {tmp!r} + "/warm.safetensors", "diffusers", dtype=torch.bfloat16)
peak, stop = [0], []
def poll():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
write = stream.StreamWriter.write
def hooked(self, key, t):  # sampled while each output tensor is alive, whatever the poller catches
    peak[0] = max(peak[0], anon())
    write(self, key, t)
stream.StreamWriter.write = hooked
# bf16 cast: a new tensor per output; diffusers -> official: a new fused tensor per qkv / linear1
for src, out, to, dtype in (("/big.safetensors", "/d.safetensors", "diffusers", torch.bfloat16),
                            ("/d.safetensors", "/o", "official", None)):
    base = peak[0] = anon()
    thread = threading.Thread(target=poll)
    thread.start()
    convert_checkpoint({tmp!r} + src, {tmp!r} + out, to, dtype=dtype, shard_bytes=40_000_000)
    stop.append(1)
    thread.join()
    stop.clear()
    print(to, peak[0] - base)
"""


def test_streaming_conversion_peak_anonymous_memory_is_about_one_tensor(flux, tmp_path):
    largest, total = big_flux_file(tmp_path / "big.safetensors")
    script = MEMORY_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path), tiny=str(flux[1]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    bound = 2 * largest + 16e6  # one new tensor beside its source, plus allocator and Python overhead
    assert total > 5 * bound  # far below the model's size, so streaming is what passes this test
    lines = out.stdout.split("\n")[:2]
    for line in lines:
        to, growth = line.split()
        assert int(growth) < bound, (to, int(growth) / 1e6, largest / 1e6)
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()
