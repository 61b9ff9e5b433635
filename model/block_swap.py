"""Block swapping: the frozen weights of the last N transformer blocks stay in host memory, and each block's copy
is streamed to the GPU just before the block runs (kohya's `--blocks_to_swap`, musubi's block swap).

What it buys: the GPU holds the other blocks plus about two swapped blocks at a time (one running, one arriving),
so Flux-dev trains or samples on cards smaller than its weights. What it costs: every forward pass (and, in
training, every recomputation) copies the swapped blocks over PCIe, ~0.7 GB per Flux double block in bf16 (half in
fp8); the copy of the next block runs on a side stream while the current one computes.

Why `functional_call` and not `param.data = gpu_copy`: autograd saves the tensors a block used for its backward.
A call that swaps the copies in as plain tensors for its duration leaves the Parameters untouched (still in host
memory) while the saved tensors are the copies, which live exactly as long as backward needs them. Swapping
`.data` in and out would change what the saved Parameters point to under autograd's feet.

With gradient checkpointing each block's forward keeps nothing, and its recomputation in backward fetches the
copy again (blocks then come in reverse order, so the prefetch runs backwards). Without checkpointing, autograd
would hold every block's copy until backward: no saving, which is why the trainer requires checkpointing.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import Tensor, nn

from .layers import named_blocks

# bytes: where each tensor of a block's buffer starts. The CUDA caching allocator's own alignment, so kernels see
# pointers aligned as for any other tensor (cuBLAS picks kernels by alignment: the same bits as unswapped)
ALIGN = 512
LORA = ("lora_down", "lora_up")  # distill/lora.py's weight sets: small, and trained or updated in place


def swappable(block: nn.Module) -> dict[str, Tensor]:
    """The block's frozen base tensors (weights, biases, fp8 scales, norms); LoRA sets and anything trained stay."""
    named = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(remove_duplicate=False))
    return {name: t for name, t in named
            if t is not None and not t.requires_grad and not any(part in LORA for part in name.split("."))}


def _nbytes(dtype: torch.dtype, shape: torch.Size) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _view(flat: Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    return flat[offset:offset + _nbytes(dtype, shape)].view(dtype).view(shape)


def _pack(tensors: dict[str, Tensor]) -> tuple[Tensor, dict[str, tuple[int, torch.dtype, torch.Size]]]:
    """One uint8 host buffer holding every tensor at an ALIGN-ed offset, and name -> (offset, dtype, shape)."""
    layout, size = {}, 0
    for name, t in tensors.items():
        layout[name] = (size, t.dtype, t.shape)
        size += -(-_nbytes(t.dtype, t.shape) // ALIGN) * ALIGN
    flat = torch.empty(size, dtype=torch.uint8)
    for name, t in tensors.items():
        _view(flat, *layout[name]).copy_(t)
    return flat, layout


def _put(store: dict, name: str, old: Tensor, new: Tensor) -> None:
    if isinstance(old, nn.Parameter) and torch._has_compatible_shallow_copy_type(old, new):
        old.data = new  # the same Parameter object, as `model.to` keeps it (CPU <-> CUDA)
    elif isinstance(old, nn.Parameter):  # e.g. to "meta": a new one, as `model.to` makes
        store[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        store[name] = new


def _pin(owner: object, flats: list[Tensor]) -> None:
    """Page-lock exactly these buffers (cudaHostRegister) for as long as `owner` lives, so that copies from them
    are asynchronous DMA. Why not `pin_memory()`: torch's pinned allocator rounds each allocation up to a power
    of two, up to twice the host memory for 0.3-0.7 GB blocks."""
    cudart = torch.cuda.cudart()
    pinned = [f for f in flats if int(cudart.cudaHostRegister(f.data_ptr(), f.numel(), 0)) == 0]
    if len(pinned) < len(flats):
        warnings.warn(f"could not page-lock {len(flats) - len(pinned)} of {len(flats)} swapped blocks' host "
                      "memory; their copies to the GPU will not overlap the computation", stacklevel=3)
    # the finalizer holds the buffers, so none is freed while registered
    weakref.finalize(owner, lambda: [cudart.cudaHostUnregister(f.data_ptr()) for f in pinned])


def check_count(model: nn.Module, n: int) -> None:
    """ValueError unless n blocks can be swapped (a meta-device model will do: nothing is read)."""
    total = len(named_blocks(model))
    if not 1 <= n < total:
        raise ValueError(f"blocks_to_swap must be between 1 and {total - 1} (this model has {total} blocks and one "
                         f"must stay on the device), got {n}")


class BlockSwap:
    """Attach with `BlockSwap(model, n, device)`: it moves everything to `device` except the swapped blocks' frozen
    tensors, which go to (pinned, on CUDA) host memory, and sets `model.block_swap`, which the model's block loop
    calls (`model/layers.BlockRunner`). Outputs and gradients are bit for bit those of the unswapped model."""

    def __init__(self, model: nn.Module, n: int, device: str | torch.device):
        check_count(model, n)
        named = named_blocks(model)
        blocks = [block for _, block in named]
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.index = {id(b): i for i, b in enumerate(blocks)}
        swapped = range(len(blocks) - n, len(blocks))
        # each swapped block's frozen tensors become views of one host buffer: one copy per block, and page-locked
        # memory of exactly its size
        self.flat: dict[int, Tensor] = {}
        self.layout: dict[int, dict[str, tuple[int, torch.dtype, torch.Size]]] = {}
        # id(tensor) -> (the tensor, held so that no id is reused while tensors are replaced; its host view)
        home: dict[int, tuple[Tensor, Tensor]] = {}
        for i in swapped:
            tensors = swappable(blocks[i])
            self.flat[i], self.layout[i] = _pack(tensors)
            home.update({id(t): (t, _view(self.flat[i], *self.layout[i][name])) for name, t in tensors.items()})
        if cuda:
            _pin(self, list(self.flat.values()))
        with torch.no_grad():
            for module in model.modules():
                for store in (module._parameters, module._buffers):
                    for name, t in store.items():
                        if t is not None:
                            _put(store, name, t, home[id(t)][1] if id(t) in home else t.to(self.device))
        self.host = {i: {name: _view(self.flat[i], *spec) for name, spec in self.layout[i].items()} for i in swapped}
        # DDP checks that every parameter is on one device and would broadcast them; the swapped ones are frozen
        model._ddp_params_and_buffers_to_ignore = sorted(
            f"{named[i][0]}.{name}" for i in swapped for name in self.host[i])
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready: dict[int, tuple[dict[str, Tensor], torch.cuda.Event | None]] = {}
        self.last: int | None = None
        # block copies made; uses served by a copy made ahead of time; uses that had to wait for a copy made then
        self.copies = self.prefetched = self.late = 0
        model.block_swap = self

    def _copy(self, i: int) -> dict[str, Tensor]:
        # copy=True: a real copy even when the device is the CPU (tests), so the path is the same everywhere
        self.copies += 1
        flat = self.flat[i].to(self.device, non_blocking=True, copy=True)
        return {name: _view(flat, *spec) for name, spec in self.layout[i].items()}

    def _prefetch(self, i: int) -> None:
        if i not in self.host or i in self.ready:
            return
        if self.stream is None:
            self.ready[i] = (self._copy(i), None)
            return
        with torch.cuda.stream(self.stream):
            tensors = self._copy(i)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[i] = (tensors, event)

    def _take(self, i: int) -> dict[str, Tensor]:
        tensors, event = self.ready.pop(i, (None, None))
        self.ready.clear()  # a prefetch that guessed wrong (a new pass started) is dropped
        if tensors is None:
            self.late += 1
            return self._copy(i)
        self.prefetched += 1
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            # made on the side stream, used and freed on this one (the views share one allocation)
            next(iter(tensors.values())).record_stream(current)
        return tensors

    def __call__(self, block: nn.Module, *args: Tensor):
        i = self.index[id(block)]
        # forward passes run the blocks in increasing order, from 0; checkpointed backward recomputes them in
        # decreasing order, starting with the block the forward ended on
        step = 1 if i == 0 or self.last is None or i > self.last else -1
        self.last = i
        tensors = self._take(i) if i in self.host else None
        if tensors is not None and step == 1 and i == len(self.index) - 1 and torch.is_grad_enabled():
            self.ready[i] = (tensors, None)  # the last block's recomputation is the first thing backward runs
        else:
            self._prefetch(i + step)
        if tensors is None:
            return block(*args)
        return torch.func.functional_call(block, tensors, args, strict=False, tie_weights=False)

