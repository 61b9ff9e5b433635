"""Training on several processes. Under torchrun the default is DDP, whose student calls go through
`StudentRoute`. With `--fsdp` (FSDP2) every process holds 1/N of the frozen base and of every LoRA set, so a
model that does not fit one GPU (Flux-dev in bf16 on 24 GB cards) trains on several.

The released trainer could not shard its model because it swaps EMA and teacher weights into the live
parameters in place (docs/method.md §10). Here every set is its own parameter of its layer (distill/lora.py), so
`fully_shard` shards them like any other: each transformer block is one shard group, gathered for its forward
(all sets: a call picks one) and freed after. Sharded tensors are DTensors; the few places that need a whole set
(checkpoints, export, loading) go through `full` and `like`, which every process must call together.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.layers import named_blocks


def is_sharded(fsdp: bool) -> bool:
    """Whether `--fsdp` shards this run: only over more than one process."""
    import torch.distributed as dist

    return fsdp and dist.is_initialized() and dist.get_world_size() > 1


def loads_on_cpu(config) -> bool:
    """Sharded or swapped, no GPU holds the whole model: it is loaded on the CPU, and each shard (below) or
    each block that stays on the device (model/block_swap.py) moves there on its own."""
    return is_sharded(config.fsdp) or config.blocks_to_swap > 0


def shard_model(model: nn.Module, device_type: str, world: int) -> None:
    """Shard each transformer block, then the rest (embedders, final layer), over the `world` processes of the
    default group. Parameters still on the CPU move to the device shard by shard, so no GPU ever holds the
    whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for _, block in named_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full(t: Tensor) -> Tensor:
    """The whole tensor: a sharded one is gathered (a collective), a plain one is itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(param: Tensor, t: Tensor) -> Tensor:
    """`t` (whole, the same on every process) laid out as `param`: sharded the same way when it is sharded."""
    if not hasattr(param, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements)


class StudentRoute:
    """Looks like the model to the velocity wrapper; grad-enabled (student) calls go through DDP so gradients
    are reduced, no-grad (target) calls go straight to the module and skip DDP's bookkeeping."""

    def __init__(self, ddp: nn.Module):
        self.ddp, self.config = ddp, ddp.module.config

    def parameters(self):
        return self.ddp.module.parameters()

    def __call__(self, *args, **kwargs):
        return (self.ddp if torch.is_grad_enabled() else self.ddp.module)(*args, **kwargs)
