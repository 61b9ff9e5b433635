"""Compiled blocks (`--compile`, model/layers.py compile_blocks) and the trainer's speed options (distill/speed.py).

The compiled runs use torch.compile's aot_eager backend (SCFM_COMPILE_BACKEND): dynamo's capture, the guards,
AOT autograd's joint graph and its partition into forward and backward all run as with inductor, without
generating C++ for each kernel, which would cost minutes on a 2-core CI machine. Inductor's kernels are
exercised on the GPU by bench/ (bench/gpu_session.sh). All compiled tests share one process's compiled code.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_trainer import config, trainer
from torch import nn

from distill import speed
from distill.config import AUTO, ConfigError
from distill.config_files import build_config
from distill.lora import LoRAConfig, inject_lora, lora_layers, set_state_dict, weight_set, weight_sets
from distill.lora_fn import lora_linear
from distill.train import build_parser
from model.flux import FLUX_CONFIGS, Flux
from tests.flux_fixtures import tiny_inputs


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("SCFM_COMPILE_BACKEND", "aot_eager")


def run(tmp_path, name: str, steps: int = 3, **kw):
    t = trainer(tmp_path / name, config(tmp_path, name, steps=steps, checkpoint_every=0, **kw))
    losses = [t.step()["loss"] for _ in range(steps)]
    return t, losses, set_state_dict(t.model, "live")


def test_compiled_training_gives_the_eager_losses_and_lora(tmp_path, aot_eager):
    """Three steps (teacher, EMA and per-element set calls, the student's backward) with checkpointing and one
    unchecked block, then with block swap: the same losses and the same trained LoRA as eager, within fp32
    reordering; and the compiled code ran (the blocks hold a compiled call)."""
    _, want_losses, want = run(tmp_path, "eager", gradient_checkpointing=True, unchecked_blocks=1)
    for name, kw in (("compiled", dict(unchecked_blocks=1)), ("swapped", dict(blocks_to_swap=2))):
        t, losses, got = run(tmp_path, name, compile=True, gradient_checkpointing=True, **kw)
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in t.model.double_blocks)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_compiled_run_says_its_warm_up_and_keeps_it_out_of_the_speed_figures(tmp_path, aot_eager, capsys):
    import json

    """After the test above, whose compiled code this run's settings share (the suite's 90 s for compiling)."""
    t = trainer(tmp_path, config(tmp_path, "warm", steps=3, checkpoint_every=0, log_every=2, compile=True,
                                 gradient_checkpointing=True, unchecked_blocks=1))
    t.run()
    assert "--compile: the first step took" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "warm" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    first, second = rows  # steps 1-2 (step 1 compiled: only step 2 timed), then step 3
    assert first["seconds_per_step"] > 0 and second["seconds_per_step"] > 0 and "compile_seconds" not in second
    assert first["images_per_second"] == pytest.approx(2 / first["seconds_per_step"])  # one step of batch 2


def test_sampling_says_the_compiled_models_first_call_once(capsys):
    """generate / make_dataset / evaluate --compile: the first transformer call (the compile's warm-up) is said in
    one line on stderr, once; the hooks saying it are gone after."""
    from sampling.base import say_first_call

    net = nn.Linear(4, 4)
    say_first_call(net)
    net(torch.ones(2, 4))
    net(torch.ones(2, 4))
    err = capsys.readouterr().err
    assert err.count("--compile: the first transformer call took") == 1 and "compiling its blocks included" in err
    assert not net._forward_hooks and not net._forward_pre_hooks


class _TwoLinears(nn.Module):  # its own forward: no compiled code cached by another test can answer for it
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.mark.parametrize("sets", [("live", "fast_ema"), ("live", "fast_ema", "slow_ema")], ids=["zero+1", "2"])
def test_per_element_sets_compile_once_into_one_graph(sets):
    """The target calls' per-element sets (teacher / fast EMA) inside compiled code: one graph (fullgraph raises
    at a graph break), compiled once for every split of the batch (a recompilation raises), each element on its
    set as eager's rows give it."""
    torch.manual_seed(0)
    net = _TwoLinears()
    inject_lora(net, LoRAConfig(rank=2, alpha=2, targets=("a", "b"), sets=sets), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_layers(net).values():
            for p in layer.lora_up.values():
                p.normal_()
    compiled = torch.compile(net, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(4, 3, 8)
    other = "teacher" if len(sets) == 2 else "slow_ema"
    splits = [[other, "fast_ema", "fast_ema", other], ["fast_ema", other, other, other],
              ["fast_ema", other, "fast_ema", other]]

    def check(split):
        with weight_sets(net, split):
            got, want = compiled(x), net(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        fast = torch.tensor([s == "fast_ema" for s in split])
        assert (got[fast] - base[fast]).abs().min() > 0  # the fast EMA's rows really carry a LoRA

    with torch.no_grad():
        base = net(x)
        check(splits[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for split in splits[1:]:
                check(split)
    with pytest.raises(ValueError, match="without grad"):  # the autograd function takes rows, not masks
        lora_linear(x.requires_grad_(), net.a.weight, None, 1.0, (12,), ((torch.ones(4), 0),),
                    (net.a.lora_down["live"], net.a.lora_up["live"]))


def test_an_unknown_compile_backend_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SCFM_COMPILE_BACKEND", "garbage")
    from distill.trainer import TrainingError

    with pytest.raises(TrainingError, match="no torch.compile backend 'garbage' .SCFM_COMPILE_BACKEND.; unset it"):
        trainer(tmp_path, config(tmp_path, "x", compile=True))


def test_a_compiler_that_drops_block_gradients_is_caught():
    torch.manual_seed(0)
    model = Flux(FLUX_CONFIGS["tiny"])
    inject_lora(model, LoRAConfig(rank=4, alpha=4, sets=("live",)), torch.Generator().manual_seed(0))
    with pytest.raises(speed.SpeedError, match="the LoRA of 4 transformer blocks .first: double_blocks.0. received"):
        speed.check_block_gradients(model)  # before any backward: nothing anywhere
    model(**tiny_inputs()).pow(2).mean().backward()
    speed.check_block_gradients(model)
    blocks = [layer for name, layer in lora_layers(model).items() if "blocks." in name]
    single = [layer for name, layer in lora_layers(model).items() if name.startswith("single_blocks.1.")]
    saved = [layer.lora_up["live"].grad.clone() for layer in single]
    for layer in single:
        layer.lora_up["live"].grad.zero_()  # one block dropped, the others trained
    with pytest.raises(speed.SpeedError, match="the LoRA of 1 transformer blocks .first: single_blocks.1."):
        speed.check_block_gradients(model)
    for layer, g in zip(single, saved):
        layer.lora_up["live"].grad = g
    single[0].lora_up["live"].grad.zero_()  # one layer of a block without a gradient: not a dropped block
    speed.check_block_gradients(model)
    for layer in blocks:
        layer.lora_up["live"].grad.zero_()  # what torch 2.11's compiled blocks left (distill/lora_fn.py)
    with pytest.raises(speed.SpeedError):
        speed.check_block_gradients(model)
    for layer in blocks:
        layer.lora_up["live"].grad = None  # what a compiled block that lost its graph leaves
    with pytest.raises(speed.SpeedError):
        speed.check_block_gradients(model)


def test_speed_options_are_read_and_refused_in_one_line(tmp_path):
    args = build_parser().parse_args(["--unchecked_blocks", "auto", "--max_memory", "40GB", "--fp8-compute",
                                      "--compile"])
    assert args.unchecked_blocks == "auto" and args.fp8_compute and args.compile
    cfg = build_config(None, {k: v for k, v in vars(args).items() if k in ("unchecked_blocks", "max_memory",
                                                                          "fp8_compute", "compile")}
                       | {"gradient_checkpointing": True})
    assert cfg.unchecked_blocks == AUTO and cfg.fp8_storage
    toml = tmp_path / "run.toml"
    toml.write_text('[runtime]\nunchecked_blocks = "auto"\nmax_memory = "30GiB"\n')
    assert build_config(str(toml)).unchecked_blocks == AUTO
    toml.write_text("[runtime]\nunchecked_blocks = 3\n")
    assert build_config(str(toml)).unchecked_blocks == 3
    for bad, match in (({"unchecked_blocks": "many"}, "block count .0 or more. or 'auto'"),
                       ({"max_memory": "40GB"}, "budget of --unchecked_blocks auto"),
                       ({"unchecked_blocks": "auto", "max_memory": "lots"}, "cannot read 'lots'"),
                       ({"unchecked_blocks": "auto", "max_memory": "0GB"}, "is no memory at all"),
                       ({"compile": True, "fsdp": True}, "compile with fsdp")):
        with pytest.raises(ConfigError, match=match):
            build_config(None, bad)


def test_fp8_compute_trains_close_to_the_dequantized_fp8_run(tmp_path):
    """The trainer's --fp8_compute: e4m3 storage implied, every block layer computing in (emulated) fp8. On the
    first batch its loss and LoRA gradient are near those of the run that only stores fp8, not equal to them."""
    grads, losses = {}, {}
    for name, kw in (("fp8c", dict(fp8_compute=True)), ("fp8", dict(fp8_base=True))):
        t = trainer(tmp_path / name, config(tmp_path, name, steps=2, checkpoint_every=0, **kw))
        assert all(layer.fp8_compute == (name == "fp8c") and layer.weight_scale is not None
                   for n, layer in lora_layers(t.model).items() if "blocks." in n)
        losses[name] = t._micro_loss(0, t.batches.batch(0), range(2)).item()
        grads[name] = torch.cat([p.grad.flatten() for _, p in t.params])
        assert t.step()["loss"] > 0  # and a whole step runs
    assert losses["fp8c"] != losses["fp8"] and abs(losses["fp8c"] / losses["fp8"] - 1) < 0.05
    cos = torch.nn.functional.cosine_similarity(grads["fp8c"], grads["fp8"], dim=0).item()
    assert 0.95 < cos < 1


@pytest.mark.parametrize("budget, blocks", [("1KB", 0), ("100GB", 4)])
def test_unchecked_blocks_auto_plans_on_the_first_batch_and_changes_no_result(tmp_path, capsys, budget, blocks):
    """The planning probe (the first batch's loss and backward, then a counted forward) leaves the run exactly
    as an explicit count would have it; a budget nothing fits keeps every block checkpointed."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        t, losses, got = run(tmp_path, "auto", gradient_checkpointing=True, unchecked_blocks=AUTO, max_memory=budget)
    assert t.model.unchecked_blocks == blocks
    over = [str(w.message) for w in said if "already peaks near" in str(w.message)]
    assert len(over) == (budget == "1KB")  # a budget below the checkpointed step itself is said, not kept quiet
    assert f"unchecked_blocks auto: {blocks} of 4 blocks" in capsys.readouterr().out
    _, want_losses, want = run(tmp_path, "fixed", gradient_checkpointing=True, unchecked_blocks=blocks)
    assert losses == want_losses and all(torch.equal(got[k], want[k]) for k in want)


def test_unchecked_blocks_auto_without_a_budget_off_cuda_is_one_line(tmp_path):
    from distill.trainer import TrainingError

    t = trainer(tmp_path / "x", config(tmp_path, "x", steps=1, gradient_checkpointing=True, unchecked_blocks=AUTO))
    with pytest.raises(TrainingError, match="max_memory") as e:
        t.step()
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU code: run by bench/gpu_session.sh")
@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("fp8_compute", [False, True], ids=["fp32", "fp8compute"])
def test_inductor_blocks_on_cuda_give_the_eager_lora_gradients(checkpointed, fp8_compute):
    """What the trainer does on a GPU, with inductor's real kernels: a no-grad call on another set first (the
    targets), then the live set with a graph, the blocks kept or checkpointed. The compiled blocks must give
    eager's LoRA gradients inside every block (a block that records no graph gives none and trains nothing)."""
    from model.fp8 import enable_fp8_compute_, quantize_linears_

    if fp8_compute and not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("fp8 GEMMs need sm89 or newer")
    torch.manual_seed(0)
    base = Flux(FLUX_CONFIGS["tiny"]).cuda()
    models = [base, copy.deepcopy(base)]
    for model in models:
        if fp8_compute:
            quantize_linears_(model)
            enable_fp8_compute_(model, "cuda")
        inject_lora(model, LoRAConfig(rank=4, alpha=4, sets=("live", "slow_ema")), torch.Generator().manual_seed(0))
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for p in layer.lora_up.values():
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        model.enable_gradient_checkpointing(checkpointed)
    models[1].compile_blocks()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tiny_inputs().items()}
    grads = []
    for model in models:
        with torch.no_grad(), weight_set(model, "slow_ema"):
            model(**inputs)
        model(**inputs).pow(2).mean().backward()  # fp32: inductor's order against eager's, nothing else
        grads.append({n: layer.lora_down["live"].grad for n, layer in lora_layers(model).items()})
    assert all(b._compiled_call_impl is not None for b in models[1].double_blocks)
    for name, want in grads[0].items():
        assert grads[1][name] is not None, f"{name}: no gradient through the compiled block"
        # fp32 differs only by inductor's order; with fp8 that order can also move an input across an e4m3
        # rounding boundary (3 mantissa bits), which moves a gradient by up to a few percent
        tol = 3e-2 if fp8_compute else 1e-4
        torch.testing.assert_close(grads[1][name], want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)
