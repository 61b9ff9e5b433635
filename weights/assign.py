"""Put checkpoint tensors into a model built on the meta device, with a strict, readable report.

Every family's loader does: build `Model(config)` under `torch.device("meta")`, check the checkpoint's keys and
shapes against it (from the safetensors header alone, before reading any tensor), then read tensors one at a time
and assign them. Peak memory is one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import torch
from torch import nn

from model.fp8 import E4M3, quantize_linears_, quantize_rows

from .io import WeightsError
from .lora_merge import merge_while_reading


def _first(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys_and_shapes(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], *, source: str, layout: str, ignore: Iterable[str] = ()
) -> None:
    """Compare checkpoint `shapes` (already in the model's names) with the model; raise one line on a mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in set(ignore)}
    missing = expected.keys() - shapes.keys()
    unexpected = shapes.keys() - expected.keys()
    if missing:
        raise WeightsError(
            f"{source}: {len(missing)} keys missing for the {layout} layout ({_first(missing)}); "
            "the file is incomplete or for a different model size: pass the matching config="
        )
    if unexpected:
        raise WeightsError(
            f"{source}: {len(unexpected)} unexpected keys for the {layout} layout ({_first(unexpected)}); "
            "the file is for a different model variant: pass the matching config="
        )
    wrong = [k for k in expected if tuple(shapes[k]) != expected[k]]
    if wrong:
        k = wrong[0]
        raise WeightsError(
            f"{source}: shape mismatch at {k}: file has {list(shapes[k])}, model expects {list(expected[k])} "
            f"({len(wrong)} mismatched keys); the config does not match the checkpoint"
        )


def assign_tensors(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    source: str,
    fp8: bool = False,
    loras: Sequence = (),
    fp32_keys: Collection[str] = (),
) -> nn.Module:
    """Move each tensor to `device` / `dtype` as it arrives and assign it; every model key must be provided.
    `fp32_keys` are cast to fp32 instead, straight from the file's dtype (T5's `wo` loaded in fp16, as
    transformers keeps it: weights/text.py load_t5).
    `loras` (a Flux or SD3 model's, as weights.lora.apply_loras takes them) are checked against the model before
    anything is read, then merged into each weight as it arrives (weights/lora_merge.merge_while_reading).

    fp8: the blocks' Linears (model/fp8.py) become Float8Linears on the meta model first, and each of their
    weights is quantized as it arrives, after its LoRAs, its `weight_scale` with it: the full-precision model
    never exists at once. On `device="meta"` nothing is read: the caller's checks and the LoRAs' are all that
    run."""
    if fp8:
        quantize_linears_(model)  # on meta: the layers to fill with e4m3 weights
    merge = None
    if loras:
        merge = merge_while_reading(model, loras)
    if torch.device(device).type == "meta":
        return model
    expected = model.state_dict()  # meta tensors: names and dtypes only
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors:
        if not t.is_floating_point() and key in expected and expected[key].is_floating_point():
            # the readers refuse these from the header before any read (weights/io.py check_float_dtypes); a
            # caller's own tensors get the same line, not load_state_dict's traceback or a silent int buffer
            raise WeightsError(f"{source}: tensor {key} is {str(t.dtype).removeprefix('torch.')}, not a "
                               "floating-point type; the file is damaged or not these weights: re-download it")
        want = torch.float32 if key in fp32_keys else dtype
        if t.is_floating_point() and t.dtype != want:
            t = t.to(want)
        t = t.to(device) if merge is None else merge(key, t.to(device))
        if t.device.type == "cpu" and t.data_ptr() % 64:
            # safetensors hands out tensors in Python buffers 8 bytes past a 64-byte line; MKL's small GEMMs (the
            # modulation's batch-1 products) round differently there on some CPUs (AMD EPYC), so the same weights
            # from two files gave images a bit apart. torch's allocator aligns to 64; one tensor is copied at a time.
            t = t.clone()
        if key in expected and expected[key].dtype == E4M3:
            state[key], state[key[: -len("weight")] + "weight_scale"] = quantize_rows(t)
        else:
            state[key] = t
    missing = expected.keys() - state.keys()
    if missing:
        raise WeightsError(f"{source}: tensors missing after reading ({_first(missing)}); the file is truncated")
    model.load_state_dict(state, strict=True, assign=True)
    return model
