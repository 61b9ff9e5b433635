"""`--unchecked_blocks auto`: how many of the first transformer blocks keep their activations for backward
(instead of recomputing them) while a training step's peak memory stays under a budget.

The plan is measured, not guessed:
- `base_peak`: the peak of one fully checkpointed step. CUDA: the allocator's own peak. Other devices, meta
  included: the storages alive before the step plus `LiveBytes`' peak during it (meta gives full-size figures
  without a GPU, for the eager operators: the math attention and the torch references of the fused kernels).
- `per_block`: what each block adds when it is not checkpointed: the bytes autograd saves while it runs, less
  the weights and the block's inputs and outputs, which the checkpointed step holds anyway.
- n: the largest count with base_peak + sum(per_block[:n]) <= max_memory.

Why a plain sum: a fully checkpointed step peaks in the backward of its last block (the recomputed activations and
the gradients through them, over every block's held input), and the unchecked blocks, being the first ones,
still hold their activations then, while their own backward, later, recomputes nothing. On meta at FLUX.1-dev
shapes (and on the CPU) this predicts the measured peak to the byte for every n but one: with every block
unchecked the last block's recomputation is gone too, and the peak is one block lower than predicted (safe).
"""

from __future__ import annotations

import gc
import itertools
import re
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.layers import named_blocks


def _storage(t: object) -> torch.UntypedStorage | None:
    """The storage of a plain dense tensor; None for anything else (sparse, nested, wrapper subclasses)."""
    if not isinstance(t, Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _key(t: object) -> int | None:
    # The StorageImpl's address: shared by all views of a storage and unique among live storages (meta storages
    # have no data pointer to tell them apart). A dead storage's address can come back for a new one.
    s = _storage(t)
    return None if s is None else s._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that operators run inside it allocated and that are still alive (`current`),
    and the most at any time (`peak`), on any device, meta included. A storage's Python object lives exactly as
    long as the storage, so a `weakref.finalize` on it reports each free. Views, in-place results and any output
    whose storage an argument already had allocate nothing."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage key -> bytes counted

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key)

    def _count(self, storage: torch.UntypedStorage, arguments: set[int]) -> None:
        key, size = storage._cdata, storage.nbytes()
        if key in self._sizes:  # one of ours, perhaps resized in place (resize_, out= operators)
            self.current += size - self._sizes[key]
            self._sizes[key] = size
        elif key not in arguments:  # a storage no argument had: this operator allocated it
            self._sizes[key] = size
            self.current += size
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        arguments = {k for k in map(_key, _leaves((args, kwargs), [])) if k is not None}
        for storage in filter(None, map(_storage, _leaves(out, []))):
            self._count(storage, arguments)
        return out


def _leaves(tree: object, out: list) -> list:
    """tree_leaves for an operator's arguments and results (tensors, scalars and lists, tuples or dicts of them),
    in the same order, without the general pytree walk's cost (it runs for every operator of a step)."""
    if isinstance(tree, (list, tuple)):
        for x in tree:
            _leaves(x, out)
    elif isinstance(tree, dict):
        for x in tree.values():
            _leaves(x, out)
    else:
        out.append(tree)
    return out


def held_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the distinct storages on `device` alive now: every tensor Python can reach (the model, inputs,
    optimiser state) and the model's gradients (which may have no Python object yet). What an allocator would
    report before a step, on devices that have no allocator to ask."""
    gc.collect()  # garbage in reference cycles would count otherwise
    # plain tensors only: subclasses wrap others (counted themselves) or, as torch.compile's fake and functional
    # tensors, claim a device while holding no memory there
    tensors = [t for t in gc.get_objects() if type(t) in (Tensor, nn.Parameter)]
    tensors += [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    sizes = {}
    for t in tensors:
        s = _storage(t) if t.device == device else None
        if s is not None:
            sizes[s._cdata] = s.nbytes()
    return sum(sizes.values())


def block_saved_bytes(model: nn.Module, forward: Callable[[], object]) -> list[int]:
    """Per block of `named_blocks(model)`: the bytes it keeps for backward when not checkpointed.

    `forward` runs one grad-enabled forward of the model (e.g. the student's), here once with checkpointing off.
    What autograd saves while a block runs is counted per storage and dropped at once (the graph is never
    backwarded), so a full-size model is measured on the device that trains it without that memory. Not counted:
    the weights, and the block's inputs and outputs, which a checkpointed step holds too (inputs for the
    recomputation; outputs are the next block's inputs). Compiled blocks run eagerly here: eager code saves at
    least what the compiled code does."""
    blocks = named_blocks(model)
    weights = {_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: list[dict[int, int]] = [{} for _ in blocks]  # per block: serial -> bytes
    # Nothing here keeps a saved storage alive, so a later one may get its address: each storage gets a serial
    # while it lives. One saved by several blocks costs once, in the first.
    serials: dict[int, int] = {}
    fresh = itertools.count()
    running: list[int] = []  # the block whose forward is saving now
    ran: set[int] = set()

    def pack(t: Tensor) -> None:  # gives backward nothing to unpack, so nothing is kept
        s = _storage(t)
        if running and s is not None and s._cdata not in weights and s._cdata not in serials:
            serials[s._cdata] = serial = next(fresh)
            weakref.finalize(s, serials.pop, s._cdata)
            saved[running[-1]][serial] = s.nbytes()

    def enter(i: int):
        def hook(module, args):
            if torch.is_grad_enabled():  # no-grad calls (a teacher's) save nothing
                running.append(i)
                ran.add(i)
        return hook

    def leave(i: int):
        def hook(module, args, out):
            if running and running[-1] == i:
                running.pop()
                for k in map(_key, tree_leaves((args, out))):
                    saved[i].pop(serials.get(k), None)
        return hook

    enabled, unchecked = model.gradient_checkpointing, model.unchecked_blocks
    handles = [h for i, (_, block) in enumerate(blocks)
               for h in (block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave(i)))]
    try:
        # off: a checkpointed block saves through saved-tensor hooks of its own, which would hide it from ours
        model.enable_gradient_checkpointing(False, 0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), \
                torch.compiler.set_stance("force_eager"):
            forward()
    finally:
        for h in handles:
            h.remove()
        model.enable_gradient_checkpointing(enabled, unchecked)
    if len(ran) < len(blocks):  # else the missing blocks would look free to keep
        raise ValueError(f"the forward ran {len(ran)} of the {len(blocks)} blocks with gradients enabled: pass one "
                         f"that runs the model as the training step does")
    return [sum(s.values()) for s in saved]


def choose_unchecked(base_peak: int, per_block: list[int], max_memory: int) -> int:
    """The most first blocks whose saved bytes, on top of the fully checkpointed peak, fit in max_memory."""
    n, peak = 0, base_peak
    for size in per_block:
        if peak + size > max_memory:
            break
        n, peak = n + 1, peak + size
    return n


# decimal for KB / MB / GB / TB, binary for KiB ... and for a bare K / M / G / T (as `free -g` and docker read it)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """'40GB' (10^9 bytes each), '40GiB' or '40G' (2^30), '38.5G', '40000MB', or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as an amount of memory: give e.g. 40GB (10^9 bytes), 40GiB or 40G "
                         f"(2^30), 38.5G, 40000MB or 512MiB, or a plain number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def default_max_memory(device: torch.device | str) -> int:
    """90% of the device memory this process can have, on CUDA: what is free now plus what it holds already (the
    model, loaded before the plan), as the peak it is compared with counts both. Other devices have no such
    figure, so the budget is asked for."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"--max_memory must be given on {device.type} (only CUDA reports its free memory)")
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.9 * (free + torch.cuda.memory_reserved(device)))


def step_peak(model: nn.Module, step: Callable[[], object], device: torch.device | str) -> int:
    """The peak memory while `step()` runs on `device`, counting what was alive before it (see the module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    before = held_bytes(model, device)
    live = LiveBytes()
    with live, torch.compiler.set_stance("force_eager"):  # a dispatch mode sees eager operators only
        step()
    return before + live.peak


def plan_unchecked(model: nn.Module, step: Callable[[], object], forward: Callable[[], object], max_memory: int,
                   device: torch.device | str) -> tuple[int, dict]:
    """How many of the first blocks to leave unchecked under `max_memory` bytes, and the figures behind it
    (base_peak, per_block, predicted_peak: bytes). The model's checkpointing settings are left as they were.

    `step`: one training step, loss and backward (run here once with every block checkpointed; optimiser state
    it creates after backward is not in its peak, so pass a budget without it or run with the state existing);
    `forward`: one grad-enabled forward of the model as the step runs it (its saved tensors are counted)."""
    if not model.gradient_checkpointing:
        raise ValueError("--unchecked_blocks auto chooses blocks to exempt from gradient checkpointing: turn it on")
    unchecked = model.unchecked_blocks
    model.enable_gradient_checkpointing(True, 0)
    try:
        base_peak = step_peak(model, step, device)
    finally:
        model.enable_gradient_checkpointing(True, unchecked)
    per_block = block_saved_bytes(model, forward)
    n = choose_unchecked(base_peak, per_block, max_memory)
    return n, {"base_peak": base_peak, "per_block": per_block, "predicted_peak": base_peak + sum(per_block[:n])}
