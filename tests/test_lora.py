"""LoRA layers with named weight sets (distill/lora.py) on the tiny Flux and a small conv."""

import pytest
import torch
from conftest import randomize_
from flux_fixtures import run_diffusers, run_ours, tiny_diffusers_flux, tiny_inputs
from torch import nn

from distill.lora import (
    FLUX_TARGETS,
    LoRAConfig,
    LoRAConv2d,
    LoRALinear,
    inject_lora,
    load_set,
    lora_layers,
    merge,
    set_state_dict,
    unmerge,
    weight_set,
    weight_sets,
)
from model.flux import FLUX_CONFIGS, Flux
from weights.keymaps import swap_halves, to_official
from weights.keymaps.flux import flux_rules

# docs/method.md §6, the released Flux list in diffusers names, as given to peft
RELEASED_FLUX = [
    *(f"time_text_embed.{e}_embedder.linear_{k}" for e in ("timestep", "text", "guidance") for k in (1, 2)),
    "context_embedder", "x_embedder", "norm.linear", "norm1.linear", "norm1_context.linear",
    "norm_out.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    "proj_out",
]
SETS4 = ("live", "fast_ema", "slow_ema", "teacher")


def tiny_flux(seed: int = 0) -> Flux:
    # frozen like an injected model: torch's matmul picks its fold path (so fp32 rounding) by requires_grad
    return randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed).eval().requires_grad_(False)


def randomize_sets_(model: nn.Module, names=SETS4, seed: int = 0, std: float = 0.1) -> None:
    """Give every set distinct random down and up matrices (the teacher set is materialised by loading it)."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        live = set_state_dict(model, "live")
        state = {key: torch.randn(t.shape, generator=g) * std for key, t in live.items()}
        load_set(model, name, state)


def with_lora(seed: int = 0, rank: int = 4, alpha: float = 8.0) -> Flux:
    model = tiny_flux(seed)
    inject_lora(model, LoRAConfig(rank=rank, alpha=alpha), torch.Generator().manual_seed(seed))
    return model


def test_default_table_wraps_every_linear_of_flux_with_the_right_slices():
    model = tiny_flux()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = inject_lora(model, LoRAConfig(rank=4))
    assert set(names) == linears and len(names) == len(linears)
    layers = lora_layers(model)
    d = FLUX_CONFIGS["tiny"].hidden_size
    assert layers["double_blocks.0.img_attn.qkv"].slices == (d, d, d)
    assert layers["single_blocks.1.linear1"].slices == (d, d, d, 4 * d)
    assert layers["final_layer.linear"].slices == (FLUX_CONFIGS["tiny"].out_channels,)
    # base weights keep their BFL names, so checkpoints load into the injected model unchanged
    assert {k for k in model.state_dict() if "lora_" not in k} == set(Flux(FLUX_CONFIGS["tiny"]).state_dict())
    # only the live set trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{p}.live" for n in names for p in ("down", "up")}


def test_zero_up_init_leaves_the_output_unchanged_and_down_is_gaussian():
    inp = tiny_inputs()
    base = tiny_flux()
    model = with_lora()
    out = run_ours(model, inp)
    for name in ("live", "fast_ema", "slow_ema", "teacher"):
        with weight_set(model, name):
            assert torch.equal(run_ours(model, inp), run_ours(base, inp)), name
    assert torch.equal(out, run_ours(base, inp))
    down = lora_layers(with_lora(rank=64))["single_blocks.0.linear1"].lora_down["live"]  # (4 * 64, 32)
    assert abs(down.std().item() - 1 / 64) < 0.1 / 64 and abs(down.mean().item()) < 1e-3


def test_sliced_forward_is_one_lora_per_slice():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3 * 6 + 10)
    layer = LoRALinear(lin, LoRAConfig(rank=2, alpha=3.0, targets=("x",)), selection=_sel(), kind="qkv_mlp")
    randomize_sets_(_wrap(layer), names=("live",))
    x = torch.randn(5, 7, 6)
    down, up = layer.lora_down["live"], layer.lora_up["live"]
    ref = lin(x)
    for i, (lo, hi) in enumerate([(0, 6), (6, 12), (12, 18), (18, 28)]):
        ref[..., lo:hi] += 1.5 * x @ down[2 * i:2 * i + 2].T @ up[lo:hi].T
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), x @ (lin.weight + layer.delta_weight("live")).T + lin.bias,
                               rtol=1e-5, atol=1e-6)
    # gradients through the in-place slice adds equal those of the plain formula
    layer(x).square().sum().backward()
    d, u = down.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    ref = lin(x).detach()
    parts = [1.5 * x @ d[2 * i:2 * i + 2].T @ u[lo:hi].T
             for i, (lo, hi) in enumerate([(0, 6), (6, 12), (12, 18), (18, 28)])]
    (ref + torch.cat(parts, dim=-1)).square().sum().backward()
    torch.testing.assert_close(down.grad, d.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.grad, u.grad, rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_restores_weights_bit_exactly():
    inp = tiny_inputs()
    model = with_lora()
    randomize_sets_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with weight_set(model, "slow_ema", multiplier=1.5):
        expected = run_ours(model, inp)
    merge(model, "slow_ema", multiplier=1.5)
    with weight_set(model, "slow_ema", multiplier=1.5):
        torch.testing.assert_close(run_ours(model, inp), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        run_ours(model, inp)  # live selected while slow_ema is merged in
    unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_per_element_sets_equal_separate_calls():
    inp = tiny_inputs(batch=4)
    inp["timesteps"] = torch.tensor([0.9, 0.5, 0.3, 0.1])
    inp["guidance"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    model = with_lora()
    randomize_sets_(model)
    choice = ["teacher", "fast_ema", "slow_ema", "fast_ema"]
    with weight_sets(model, choice):
        mixed = run_ours(model, inp)
    with weight_sets(model, torch.tensor([3, 1, 2, 1])):  # the same choice as indices into SETS
        assert torch.equal(run_ours(model, inp), mixed)
    for b, name in enumerate(choice):
        with weight_set(model, name):
            full = run_ours(model, inp)
        # the same math; only the LoRA matmuls see a different number of rows, which may change fp32 rounding
        torch.testing.assert_close(mixed[b], full[b], rtol=1e-5, atol=1e-6 * full.abs().max().item())
    # the four sets really differ, so a mix-up could not pass
    outs = []
    for name in SETS4:
        with weight_set(model, name):
            outs.append(run_ours(model, inp))
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(outs) for b in outs[i + 1:])


def test_runs_of_elements_equal_scattered_rows_with_gradient():
    """Contiguous runs of one set (how scfm_loss orders a batch) are read and written as views; they must give
    what the gather / scatter path gives for the same rows, in the forward and in the live set's gradient."""
    inp = tiny_inputs(batch=4)
    inp["timesteps"] = torch.tensor([0.9, 0.5, 0.3, 0.1])
    inp["guidance"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    model = with_lora()
    randomize_sets_(model, names=("live", "fast_ema"))
    results = []
    for order in ([0, 1, 2, 3], [0, 2, 1, 3]):  # sets live, live, fast, fast: runs; then interleaved rows
        perm = torch.tensor(order)
        x = {k: v if k.endswith("_ids") else v[perm] for k, v in inp.items()}
        with weight_sets(model, [["live", "live", "fast_ema", "fast_ema"][i] for i in order]):
            out = model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
        out.pow(2).sum().backward()
        grads = [layer.lora_up["live"].grad.clone() for layer in lora_layers(model).values()]
        model.zero_grad(set_to_none=True)
        results.append((out[torch.argsort(perm)], grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())
    assert any(g.abs().max() > 0 for g in ga)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6 * (1 + y.abs().max().item()))


def test_zero_teacher_is_the_base_model_per_element():
    inp = tiny_inputs(batch=2)
    base = tiny_flux()
    model = with_lora()
    randomize_sets_(model, names=("live", "fast_ema"))
    with weight_sets(model, ["teacher", "fast_ema"]):
        mixed = run_ours(model, inp)
    torch.testing.assert_close(mixed[:1], run_ours(base, inp)[:1], rtol=1e-5, atol=1e-6)
    assert (mixed[1:] - run_ours(base, inp)[1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="per-element"), weight_sets(model, ["teacher", "fast_ema", "live"]):
        run_ours(model, inp)


def test_set_state_dict_round_trip_and_gradients_reach_only_live():
    inp = tiny_inputs()
    a, b = with_lora(0), with_lora(0)
    randomize_sets_(a, seed=1)
    for name in ("live", "slow_ema"):
        load_set(b, name, {k: v.clone() for k, v in set_state_dict(a, name).items()})
        with weight_set(a, name), weight_set(b, name):
            assert torch.equal(run_ours(a, inp), run_ours(b, inp))
    with pytest.raises(KeyError):
        load_set(b, "live", {})
    model = with_lora()
    randomize_sets_(model)
    model(**{k: v for k, v in inp.items()}).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n and n.endswith(".live") for n in grads)


def test_conv2d_lora_zero_init_per_element_and_merge():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Conv2d(4, 6, kernel_size=2, stride=2))
    x = torch.randn(3, 4, 8, 8)
    ref = net.proj(x)
    inject_lora(net, LoRAConfig(rank=3, alpha=3.0, targets=("proj",)))
    assert isinstance(net.proj, LoRAConv2d) and torch.equal(net(x), ref)
    randomize_sets_(net, names=("live", "fast_ema", "slow_ema"))
    with weight_sets(net, ["fast_ema", "live", "teacher"]):
        mixed = net(x)
    with weight_set(net, "fast_ema"):
        torch.testing.assert_close(mixed[:1], net(x[:1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1:2], net(x[1:2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2:], ref[2:], rtol=1e-5, atol=1e-6)
    before = net.proj.weight.clone()
    expected = net(x)
    merge(net, "live")
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    unmerge(net)
    assert torch.equal(net.proj.weight, before)


def test_config_validation():
    with pytest.raises(ValueError, match="fused kind"):
        LoRAConfig(targets=("a.qkv:qvk",))
    with pytest.raises(ValueError, match="live"):
        LoRAConfig(sets=("fast_ema",))
    with pytest.raises(ValueError, match="matches the LoRA targets"):
        inject_lora(nn.Sequential(nn.Linear(2, 2)), LoRAConfig())


# ----- the table against peft given the released diffusers list ---------------------------------------------


def _diffusers_names(layers: dict, rules) -> set[str]:
    """Our wrapped BFL modules -> diffusers modules, one per slice, through the weights key map."""
    by_official = {r.official: r for r in rules}
    out = set()
    for name, layer in layers.items():
        rule = by_official[name]
        assert len(rule.others) == len(layer.slices), name  # one diffusers module per LoRA slice
        out |= set(rule.others)
    return out


def test_table_equals_what_peft_wraps_for_the_released_list():
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    ref = tiny_diffusers_flux()
    inject_adapter_in_model(PeftConfig(r=2, lora_alpha=2, target_modules=RELEASED_FLUX), ref)
    wrapped = {n for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)}
    ours = tiny_flux()
    layers = {n: lora_layers(ours)[n] for n in inject_lora(ours, LoRAConfig(rank=2))}
    cfg = FLUX_CONFIGS["tiny"]
    rules = flux_rules(cfg.depth, cfg.depth_single_blocks, True, modules=True)
    assert _diffusers_names(layers, rules) == wrapped
    # proj_out is both the single blocks' linear2 and the final layer; both are in our table
    assert {"proj_out", "single_transformer_blocks.0.proj_out"} <= wrapped
    assert "final_layer.linear" in layers and "single_blocks.0.linear2" in layers
    assert len(FLUX_TARGETS) == 23


def test_same_lora_gives_the_same_output_as_peft():
    """Our per-slice LoRAs, split into peft's modules (norm_out B rows swapped), match peft's forward."""
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    inp = tiny_inputs()
    ref = tiny_diffusers_flux(sigma=0.2)
    cfg = FLUX_CONFIGS["tiny"]
    ours = Flux(cfg)
    module_rules = flux_rules(cfg.depth, cfg.depth_single_blocks, True, modules=True)
    ours.load_state_dict(dict(to_official(flux_rules(cfg.depth, cfg.depth_single_blocks, True),
                                          ref.state_dict().__getitem__)))
    ours.eval()
    rank, alpha = 2, 6.0
    inject_lora(ours, LoRAConfig(rank=rank, alpha=alpha))
    randomize_sets_(ours, names=("live",), std=0.4)
    peft_sd = {}
    for rule in module_rules:
        if rule.official not in lora_layers(ours):
            continue  # q/k norm scales: not LoRA targets
        layer = lora_layers(ours)[rule.official]
        downs = layer.lora_down["live"].chunk(len(layer.slices))
        ups = layer.lora_up["live"].split(layer.slices)
        for other, down, up in zip(rule.others, downs, ups):
            # diffusers' norm_out chunks (scale, shift): the output rows, so B's rows, swap; A does not
            peft_sd[f"{other}.lora_A.weight"] = down.clone()
            peft_sd[f"{other}.lora_B.weight"] = swap_halves(up) if rule.kind == "swap" else up.clone()
    inject_adapter_in_model(PeftConfig(r=rank, lora_alpha=alpha, target_modules=RELEASED_FLUX), ref)
    result = set_peft_model_state_dict(ref, peft_sd)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    expected = run_diffusers(ref, inp)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(run_ours(ours, inp), expected, rtol=1e-4, atol=1e-5 * scale)
    with weight_set(ours, "teacher"):  # and the LoRA really changes the output
        assert (run_ours(ours, inp) - expected).abs().max() > 1e-2
    # without the norm_out row swap the two disagree: the final adaLN LoRA is checked, not just loaded
    unswapped = tiny_diffusers_flux(sigma=0.2)
    inject_adapter_in_model(PeftConfig(r=rank, lora_alpha=alpha, target_modules=RELEASED_FLUX), unswapped)
    key = "norm_out.linear.lora_B.weight"
    set_peft_model_state_dict(unswapped, {**peft_sd, key: swap_halves(peft_sd[key])})
    assert (run_diffusers(unswapped, inp) - expected).abs().max() > 100 * 1e-5 * scale


# ----- helpers for single layers ----------------------------------------------------------------------------


def _sel():
    from distill.lora import Selection

    return Selection()


def _wrap(layer: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.layer = layer
    holder.lora_selection = layer.selection
    return holder


# ----- the SD3.5 table the same way (no SAI-layout model exists yet: a skeleton of its Linear names) -------

RELEASED_SD3 = [
    *(f"time_text_embed.{e}_embedder.linear_{k}" for e in ("timestep", "text") for k in (1, 2)),
    "pos_embed.proj", "context_embedder", "norm1.linear", "norm2.linear",
    "attn.to_q", "attn.to_k", "attn.to_v",
    "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "norm_out.linear", "proj_out",
]
# diffusers module -> SAI module (docs/models.md §3.4); q/k/v map onto one fused qkv
_SD3_NAMES = [
    (r"pos_embed\.proj", "x_embedder.proj"),
    (r"time_text_embed\.timestep_embedder\.linear_(\d)", lambda m: f"t_embedder.mlp.{2 * int(m[1]) - 2}"),
    (r"time_text_embed\.text_embedder\.linear_(\d)", lambda m: f"y_embedder.mlp.{2 * int(m[1]) - 2}"),
    (r"context_embedder", "context_embedder"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear",
     r"joint_blocks.\1.context_block.adaLN_modulation.1"),
    (r"transformer_blocks\.(\d+)\.attn\.to_[qkv]", r"joint_blocks.\1.x_block.attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_[qkv]_proj", r"joint_blocks.\1.context_block.attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_[qkv]", r"joint_blocks.\1.x_block.attn2.qkv"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
    (r"proj_out", "final_layer.linear"),
]


def test_sd3_table_equals_what_peft_wraps_for_the_released_list():
    import re

    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from distill.lora import SD3_TARGETS, LoRAConfig

    # docs/models.md §3.1 tiny: 3 layers so the last block is context_pre_only, dual attention in blocks 0 and 1
    ref = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1),
    )
    sai: dict[str, list[str]] = {}  # SAI module -> its diffusers modules
    skeleton = nn.Module()
    for name, module in ref.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        mapped = [re.sub(p, r, name) for p, r in _SD3_NAMES if re.fullmatch(p, name)]
        assert len(mapped) == 1, name
        sai.setdefault(mapped[0], []).append(name)
    for name, parts in sai.items():  # one Linear / Conv2d per SAI module, fused widths summed
        first = ref.get_submodule(parts[0])
        out = sum(ref.get_submodule(p).weight.shape[0] for p in parts)
        if isinstance(first, nn.Conv2d):
            layer = nn.Conv2d(first.in_channels, out, first.kernel_size, first.stride)
        else:
            layer = nn.Linear(first.in_features, out)
        parent = skeleton
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], layer)
    ours = inject_lora(skeleton, LoRAConfig(targets=SD3_TARGETS))
    assert isinstance(skeleton.get_submodule("x_embedder.proj"), LoRAConv2d)
    assert all(len(lora_layers(skeleton)[n].slices) == len(sai[n]) for n in ours)  # one slice per q/k/v
    inject_adapter_in_model(PeftConfig(r=2, lora_alpha=2, target_modules=RELEASED_SD3), ref)
    wrapped = {n for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)}
    assert {d for n in ours for d in sai[n]} == wrapped
    assert not any("attn2" in n for n in wrapped)  # `attn.to_q` does not reach the dual blocks' attn2
