"""weights/lora_resize.py: truncated-SVD rank reduction and casting of LoRA files, checked against the SVD of
the dense delta_W, through every file layout, and from the command line."""

import pytest
import torch
from conftest import random_lora, randomize_
from mmdit_fixtures import SD35_TINY

from model.flux import FLUX_CONFIGS, Flux
from model.mmdit import MMDiT
from tools.convert import main as convert
from weights import WeightsError, read_lora, write_lora
from weights.lora_resize import resize_lora, summary

R = 6


@pytest.fixture(scope="module")
def lora():
    """A rank-6 Flux LoRA whose q / k slices of one fused layer differ in rank and whose v slice has none."""
    out = random_lora(randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed=1), seed=2, rank=R, alpha=3.0)
    qkv = out.modules["double_blocks.0.img_attn.qkv"]
    q = qkv.parts[0]
    qkv.parts[0] = type(q)(q.down[:4].clone(), q.up[:, :4].clone(), 2.0)  # rank 4, alpha 2
    qkv.parts[2] = None
    return out


def dense_truncation(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-k approximation of delta (float64, from its full SVD) and its singular values."""
    u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def slices(mod, delta):
    start = 0
    for part, n in zip(mod.parts, mod.rows):
        yield part, delta[start:start + n]
        start += n


def test_without_a_limit_the_deltas_come_back(lora):
    same, report = resize_lora(lora)
    assert [r.new_rank for r in report] == [r.rank for r in report]
    for m, mod in lora.modules.items():
        torch.testing.assert_close(same.modules[m].delta(), mod.delta(), rtol=1e-5, atol=1e-6)
    assert same.modules["double_blocks.0.img_attn.qkv"].parts[2] is None
    assert same.recommended == lora.recommended and same.family == lora.family


@pytest.mark.parametrize("k", [1, 3])
def test_a_rank_limit_gives_the_best_approximation_of_each_slice(lora, k):
    small, report = resize_lora(lora, rank=k)
    assert {r.new_rank for r in report} == {k}
    kept = {(r.module, r.slice): r.kept for r in report}
    for m, mod in lora.modules.items():
        for i, ((part, old), (new, got)) in enumerate(zip(slices(mod, mod.delta()),
                                                           slices(small.modules[m], small.modules[m].delta()))):
            if part is None:
                assert new is None
                continue
            want, s = dense_truncation(old, k)
            assert new.up.shape[1] == new.down.shape[0] == k and new.scale == 1.0
            torch.testing.assert_close(got.flatten(1).double(), want, rtol=1e-5, atol=1e-6)
            assert kept[m, i] == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-6)


def test_an_energy_share_picks_the_fewest_singular_values_that_hold_it(lora):
    _, report = resize_lora(lora, energy=0.9)
    assert len({r.new_rank for r in report}) > 1  # per slice
    for r in report:
        part = lora.modules[r.module].parts[r.slice]
        s = torch.linalg.svdvals(part.scale * part.up.double() @ part.down.double())
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert share[r.new_rank - 1] >= 0.9 - 1e-9 and (r.new_rank == 1 or share[r.new_rank - 2] < 0.9)
        assert r.kept >= 0.9 - 1e-9
    _, report = resize_lora(lora, energy=0.9, rank=2)
    assert max(r.new_rank for r in report) == 2
    assert "squared norm kept" in summary(report)


def test_conv_lora_keeps_its_kernel_shape_and_cast_changes_only_the_dtype(tmp_path):
    sd3 = random_lora(randomize_(MMDiT(SD35_TINY), 0.2, seed=1), seed=2, rank=R, family="sd3")
    small, _ = resize_lora(sd3, rank=3, dtype=torch.bfloat16)
    conv, new = sd3.modules["x_embedder.proj"].parts[0], small.modules["x_embedder.proj"].parts[0]
    assert new.down.shape == (3, *conv.down.shape[1:]) and new.up.shape == (conv.up.shape[0], 3, 1, 1)
    assert {p.up.dtype for m in small.modules.values() for p in m.parts if p} == {torch.bfloat16}
    want, _ = dense_truncation(sd3.modules["x_embedder.proj"].delta(), 3)
    got = small.modules["x_embedder.proj"].delta()
    torch.testing.assert_close(got.flatten(1).double(), want, rtol=2e-2, atol=2e-3)  # bf16 factors


@pytest.mark.parametrize("layout", ["ours", "diffusers", "kohya"])
def test_mixed_ranks_write_and_read_back_in_every_layout(lora, tmp_path, layout):
    small, _ = resize_lora(lora, energy=0.9)
    again = read_lora(write_lora(small, tmp_path / "x.safetensors", layout))
    for m, mod in small.modules.items():
        torch.testing.assert_close(again.modules[m].delta(), mod.delta(), rtol=1e-5, atol=1e-6)


def test_bad_limits_are_one_line_errors(lora):
    with pytest.raises(WeightsError, match="rank must be >= 1"):
        resize_lora(lora, rank=0)
    with pytest.raises(WeightsError, match=r"energy must be in \(0, 1\]"):
        resize_lora(lora, energy=1.5)


def test_cli_resizes_casts_and_reports(lora, tmp_path, capsys):
    src = write_lora(lora, tmp_path / "in.safetensors", "kohya")
    out = tmp_path / "out.safetensors"
    assert convert(["lora", str(src), str(out), "--to", "ours", "--rank", "2", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert f"rank {R} -> 2" in printed and "MB ->" in printed  # kohya padded q to rank 6
    small = read_lora(out)
    assert {p.up.shape[1] for m in small.modules.values() for p in m.parts if p} == {2}
    assert {p.up.dtype for m in small.modules.values() for p in m.parts if p} == {torch.bfloat16}
    assert convert(["lora", str(src), str(out), "--to", "ours", "--rank", "2"]) == 2  # no --overwrite
