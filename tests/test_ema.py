"""EMA weight sets (distill/ema.py)."""

import pytest
import torch
from torch import nn

from distill.ema import EMAConfig, ema_restart, ema_step, ema_update
from distill.lora import LoRAConfig, inject_lora, load_set, set_state_dict


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("qkv", nn.Linear(4, 12))
    model.add_module("out", nn.Linear(12, 3))
    inject_lora(model, LoRAConfig(rank=2, targets=("qkv:qkv", "out")), torch.Generator().manual_seed(seed))
    return model


def set_live_(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in set_state_dict(model, "live").items()}
    load_set(model, "live", state)
    return state


def test_emas_start_at_zero_and_are_fp32():
    model = small_model()
    for name in ("fast_ema", "slow_ema"):
        sd = set_state_dict(model, name)
        assert all(t.dtype == torch.float32 and not t.any() for t in sd.values())
    assert EMAConfig().decays() == {"fast_ema": 0.99, "slow_ema": 0.999}


def test_update_is_the_ema_formula_and_touches_only_its_target():
    model = small_model()
    live = set_live_(model, 1)
    g = torch.Generator().manual_seed(2)
    fast0 = {k: torch.randn(v.shape, generator=g) for k, v in live.items()}
    load_set(model, "fast_ema", fast0)
    slow0 = {k: v.clone() for k, v in set_state_dict(model, "slow_ema").items()}
    ema_update(model, "fast_ema", 0.99)
    fast = set_state_dict(model, "fast_ema")
    for k in live:
        torch.testing.assert_close(fast[k], 0.99 * fast0[k] + 0.01 * live[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(set_state_dict(model, "live")[k], live[k])
        assert torch.equal(set_state_dict(model, "slow_ema")[k], slow0[k])


def test_steps_follow_the_closed_form_and_restart_resets_to_live():
    model = small_model()
    live = set_live_(model, 3)
    config = EMAConfig(restart_every=5)
    for step in range(1, 6):
        ema_step(model, config, step)
    # from zero with a constant live: ema_n = (1 - decay^n) live
    for name, decay in config.decays().items():
        sd = set_state_dict(model, name)
        for k in live:
            torch.testing.assert_close(sd[k], (1 - decay**5) * live[k], rtol=1e-5, atol=1e-6)
    ema_step(model, config, 6)  # a restart: after update R + 1, as the released trainer times it
    for name in ("fast_ema", "slow_ema"):
        sd = set_state_dict(model, name)
        assert all(torch.equal(sd[k], live[k]) for k in live)
    new_live = set_live_(model, 5)
    ema_step(model, EMAConfig(), 10)  # restart_every=0: a plain update at step 10, no reset to live
    fast = set_state_dict(model, "fast_ema")
    for k in live:
        torch.testing.assert_close(fast[k], 0.99 * live[k] + 0.01 * new_live[k], rtol=1e-6, atol=1e-7)


def test_restart_copies_and_rejects_non_fp32_and_bad_configs():
    model = small_model()
    live = set_live_(model, 4)
    ema_restart(model, ("slow_ema",))
    assert all(torch.equal(set_state_dict(model, "slow_ema")[k], live[k]) for k in live)
    assert not any(t.any() for t in set_state_dict(model, "fast_ema").values())
    model.qkv.lora_down["fast_ema"].data = model.qkv.lora_down["fast_ema"].data.bfloat16()
    with pytest.raises(TypeError, match="fp32"):
        ema_update(model, "fast_ema", 0.99)
    with pytest.raises(ValueError):
        EMAConfig(fast_decay=1.0)
