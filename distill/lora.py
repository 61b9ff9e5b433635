"""LoRA layers that hold several named weight sets (live, fast EMA, slow EMA, teacher) and pick one per call.

The released SCFM trainer copies EMA and teacher weights into the live parameters around every no-grad call
(docs/method.md §10). Here each set is its own tensors and the forward reads the set the caller selected:

    with weight_set(model, "slow_ema"):
        v = model(...)
    with weight_sets(model, ["teacher", "fast_ema", "fast_ema", "teacher"]):  # one set per batch element
        v = model(...)

Outside any context the `live` set is used, so activation checkpointing recomputes the student's forward
with the right weights when backward runs after the context has exited (so run backward outside any context).
Every set is an `nn.Parameter` of the layer (only `live` requires grad), so FSDP can shard all of them.

A fused layer (Flux `qkv`, single-block `linear1`) gets one LoRA per output slice, as peft gives the separate
diffusers modules. A layer's set is stored as `down` (S*r, in) = the S slices' down matrices stacked, and `up`
(out, r), whose rows of slice i act on the i-th r-wide chunk of `down @ x`. With S = 1 this is the usual LoRA.
The Linear's math, forward and backward, is one autograd function in `lora_fn.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fp8 import Float8Weight, linear

from .lora_fn import is_mask, lora_linear, rows_of
from .lora_targets import (  # noqa: F401  (the tables and config are part of this module's API)
    FLUX_TARGETS,
    SD3_TARGETS,
    SETS,
    LoRAConfig,
    parse_target,
    slice_sizes,
)
from .sharding import full, like

# ----- which set each call uses -----------------------------------------------------------------------------


class Selection:
    """The set choice shared by every LoRA layer of one model: changed once per call, read by each layer."""

    def __init__(self):
        self.name: str | None = "live"  # one set for the whole batch, or None when chosen per element
        self.groups: tuple[tuple[str, Tensor | slice], ...] = ()  # (set, batch rows) when per element
        # the same choice as (set, (B,) 0/1 fp32 mask): what compiled blocks read (LoRALayer._masked)
        self.masks: tuple[tuple[str, Tensor], ...] = ()
        self.batch = 0
        self.multiplier = 1.0
        self._on_device: dict[torch.device, tuple[tuple[str, Tensor | slice], ...]] = {}

    def groups_on(self, device: torch.device) -> tuple[tuple[str, Tensor | slice], ...]:
        # one host-to-device copy per call, not one per layer
        if device not in self._on_device:
            self._on_device[device] = tuple((n, rows if isinstance(rows, slice) else rows.to(device))
                                            for n, rows in self.groups)
        return self._on_device[device]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _selection(model: nn.Module) -> Selection:
    sel = getattr(model, "lora_selection", None)
    if isinstance(sel, Selection):
        return sel
    for m in model.modules():  # a wrapper (DDP, FSDP) or a sub-module: the layers share one Selection
        if isinstance(m, LoRALayer):
            return m.selection
    raise ValueError("this model has no LoRA layers; call inject_lora first")


@contextlib.contextmanager
def _selected(sel: Selection, name: str | None, groups, batch: int, multiplier: float, masks=()) -> Iterator[None]:
    saved = (sel.name, sel.groups, sel.masks, sel.batch, sel.multiplier, sel._on_device)
    sel.name, sel.groups, sel.masks, sel.batch, sel.multiplier, sel._on_device = (
        name, groups, masks, batch, multiplier, {})
    try:
        yield
    finally:
        sel.name, sel.groups, sel.masks, sel.batch, sel.multiplier, sel._on_device = saved


def weight_set(model: nn.Module, name: str, multiplier: float = 1.0) -> contextlib.AbstractContextManager:
    """Every LoRA layer of `model` uses set `name` (times `multiplier`) inside the context."""
    return _selected(_selection(model), name, (), 0, multiplier)


def weight_sets(
    model: nn.Module,
    per_element: Sequence[str] | Tensor,
    names: Sequence[str] = SETS,
    multiplier: float = 1.0,
    device: torch.device | str | None = None,
) -> contextlib.AbstractContextManager:
    """Batch element b uses set `per_element[b]`: a list of set names, or a (B,) index tensor into `names`.
    `device`: where the model computes (default: the index tensor's device, else the CPU), for the masks that
    compiled blocks read; another device costs each layer a copy of B numbers."""
    if isinstance(per_element, Tensor):
        device = per_element.device if device is None else device
        index = per_element.detach().long().cpu()  # one sync per call; the layers then need none
        per_element = [names[k] for k in index.tolist()]
    per_element = list(per_element)
    if len(set(per_element)) == 1:
        return weight_set(model, per_element[0], multiplier)
    order = dict.fromkeys(per_element)
    groups = tuple((n, _rows([b for b, m in enumerate(per_element) if m == n])) for n in order)
    # sorted: the same sets in another split are the same graph inputs (compiled code guards on their order)
    masks = tuple((n, torch.tensor([float(m == n) for m in per_element], device=device)) for n in sorted(order))
    return _selected(_selection(model), None, groups, len(per_element), multiplier, masks)


def _rows(rows: list[int]) -> Tensor | slice:
    """A contiguous run of elements as a slice (views in and out, no gather or scatter), else an index tensor."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long)


# ----- the layers -------------------------------------------------------------------------------------------


class LoRALayer(Float8Weight, nn.Module):
    """Base weights under their original names (`weight`, `bias`, and `weight_scale` when the base weight is
    stored in e4m3, `model/fp8.py`) plus `lora_down[set]`, `lora_up[set]`."""

    def __init__(self, base: nn.Module, config: LoRAConfig, selection: Selection, slices: tuple[int, ...],
                 down_shape: tuple[int, ...], up_shape: tuple[int, ...], generator: torch.Generator | None):
        super().__init__()
        self.weight = base.weight  # the same Parameter objects: names, storage and optimiser state unchanged
        self.register_parameter("bias", base.bias)
        self.register_buffer("weight_scale", getattr(base, "weight_scale", None))
        self.fp8_compute = getattr(base, "fp8_compute", False)  # set on the quantized layer before injection
        self.rank, self.scale, self.slices = config.rank, config.scale, slices
        self.selection = selection  # shared, not a sub-module
        self.zero_sets = set(config.zero_sets)
        self._merged: tuple[str, float, Tensor] | None = None
        device = base.weight.device
        std = config.init_std if config.init_std is not None else 1.0 / config.rank
        # LoRA tensors stay fp32 whatever the base dtype: the EMAs need it and the forward casts per call
        down = torch.randn(down_shape, generator=generator, dtype=torch.float32).to(device) * std
        self.lora_down = nn.ParameterDict()
        self.lora_up = nn.ParameterDict()
        for name in config.sets:
            live = name == "live"
            # EMAs start at zero (the base model, docs/method.md §3); live gets Gaussian down, zero up
            init = down.clone() if live else torch.zeros_like(down)
            self.lora_down[name] = nn.Parameter(init, requires_grad=live)
            self.lora_up[name] = nn.Parameter(torch.zeros(up_shape, device=device), requires_grad=live)

    def set_names(self) -> tuple[str, ...]:
        return tuple(self.lora_down.keys())

    def _base(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _with_lora(self, x: Tensor, groups: tuple[tuple[Tensor | slice | None, str], ...], scale: float) -> Tensor:
        """The base output plus, for each (batch rows, set) group, that set's LoRA on those rows."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """scale * up @ down per slice, fp32, in the base weight's shape (zero for a zero set)."""
        raise NotImplementedError

    def _is_zero(self, name: str) -> bool:
        if name in self.lora_down:
            return False
        if name in self.zero_sets:
            return True
        known = self.set_names() + tuple(self.zero_sets)
        raise KeyError(f"unknown LoRA weight set {name!r}; this layer has {known}")

    def forward(self, x: Tensor) -> Tensor:
        sel = self.selection
        if self._merged is not None:
            if (sel.name, sel.multiplier) != self._merged[:2]:
                raise RuntimeError(f"set {self._merged[0]!r} is merged; unmerge before selecting another set")
            return self._base(x)
        if sel.name is not None:
            groups = () if self._is_zero(sel.name) else ((None, sel.name),)
            return self._with_lora(x, groups, self.scale * sel.multiplier)
        if x.shape[0] != sel.batch:
            raise ValueError(f"per-element sets chosen for {sel.batch} elements, the input has {x.shape[0]}")
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self._masked(x)
        return self._per_element(x)

    def _masked(self, x: Tensor) -> Tensor:
        """Sets chosen per batch element inside a compiled block, without a graph: each set's LoRA on every
        element, times that set's 0/1 mask. The masks are inputs of the graph, so the split (how many teacher
        elements, which changes every step) compiles nothing again; the price is each set's LoRA GEMMs on all
        rows (rank 64 on Flux-dev's widths: some 4% of the base GEMMs' FLOPs, in the step's first target call).
        Only without grad (the target calls): the autograd function takes rows, not masks."""
        sel = self.selection
        groups = tuple((mask if mask.device == x.device else mask.to(x.device), n)
                       for n, mask in sel.masks if not self._is_zero(n))
        return self._with_lora(x, groups, self.scale * sel.multiplier)

    @torch.compiler.disable
    def _per_element(self, x: Tensor) -> Tensor:
        """Sets chosen per batch element, eager. Inside a compiled block with grad this stays eager (a graph
        break): as constants of a compiled graph each split would compile the blocks again."""
        sel = self.selection
        # rows: a slice for a run of elements (scfm_loss orders them so), else an index tensor
        groups = tuple((rows, n) for n, rows in sel.groups_on(x.device) if not self._is_zero(n))
        return self._with_lora(x, groups, self.scale * sel.multiplier)


class LoRALinear(LoRALayer):
    def __init__(self, base: nn.Linear, config: LoRAConfig, selection: Selection, kind: str = "",
                 generator: torch.Generator | None = None):
        slices = slice_sizes(kind, base.in_features, base.out_features)
        super().__init__(base, config, selection, slices, (len(slices) * config.rank, base.in_features),
                         (base.out_features, config.rank), generator)
        self.in_features, self.out_features = base.in_features, base.out_features

    def _base(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.weight_scale, self.bias, self.fp8_compute)

    def _with_lora(self, x: Tensor, groups, scale: float) -> Tensor:
        names = list(dict.fromkeys(n for _, n in groups))
        factors = tuple(t for n in names for t in (self.lora_down[n], self.lora_up[n]))
        indexed = tuple((rows, names.index(n)) for rows, n in groups)
        return lora_linear(x, self.weight, self.bias, scale, self.slices, indexed, factors, self.weight_scale,
                           self.fp8_compute)

    def delta_weight(self, name: str) -> Tensor:
        if name not in self.lora_down:
            return torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        downs = self.lora_down[name].detach().chunk(len(self.slices), dim=0)  # S x (r, in)
        ups = self.lora_up[name].detach().split(self.slices, dim=0)  # S x (out_i, r)
        return torch.cat([u @ d for u, d in zip(ups, downs)], dim=0) * self.scale  # (out, in)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, slices={self.slices}"


class LoRAConv2d(LoRALayer):
    """down = a conv with the base's kernel, stride and padding (in -> r); up = a 1x1 conv (r -> out)."""

    def __init__(self, base: nn.Conv2d, config: LoRAConfig, selection: Selection, kind: str = "",
                 generator: torch.Generator | None = None):
        if kind:
            raise ValueError("per-slice LoRAs are for Linear layers only")
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError("LoRAConv2d supports groups=1, zero padding given as numbers")
        down_shape = (config.rank, base.in_channels, *base.kernel_size)
        super().__init__(base, config, selection, (base.out_channels,), down_shape,
                         (base.out_channels, config.rank, 1, 1), generator)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation

    def _base(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _with_lora(self, x: Tensor, groups, scale: float) -> Tensor:
        # one layer per forward (SD3.5's patch embedding): plain autograd ops are cheap enough here
        out = self._base(x)
        for rows, name in groups:
            down, up = self.lora_down[name].to(x.dtype), self.lora_up[name].to(x.dtype)
            h = F.conv2d(rows_of(x, rows), down, None, self.stride, self.padding, self.dilation)  # (n, r, H', W')
            delta = F.conv2d(h * scale, up).to(out.dtype)  # (n, out, H', W')
            if is_mask(rows):
                out = out + delta * rows.view(-1, 1, 1, 1).to(delta.dtype)
            elif rows is None or isinstance(rows, slice):
                rows_of(out, rows).add_(delta)  # backward of conv needs its inputs, not `out`
            else:
                out.index_add_(0, rows, delta)
        return out

    def delta_weight(self, name: str) -> Tensor:
        if name not in self.lora_down:
            return torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        up = self.lora_up[name].detach()[:, :, 0, 0]  # (out, r)
        return torch.einsum("or,rihw->oihw", up, self.lora_down[name].detach()) * self.scale


# ----- injection, merging and the sets as state dicts -------------------------------------------------------


def inject_lora(model: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None) -> list[str]:
    """Replace every Linear / Conv2d whose full name matches a target; returns the wrapped names in order.

    The whole base model is frozen: only the `live` LoRA tensors require gradients afterwards.
    """
    patterns = [parse_target(t) for t in config.targets]
    sel = getattr(model, "lora_selection", None) or Selection()
    found: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        kinds = [kind for pattern, kind in patterns if pattern.fullmatch(name)]
        if not kinds:
            continue
        if len(set(kinds)) > 1:
            raise ValueError(f"{name} matches targets with different fused kinds {kinds}")
        if isinstance(module, LoRALayer):
            raise TypeError(f"{name} already has a LoRA")
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"target {name} is a {type(module).__name__}, not a Linear or Conv2d")
        found.append((name, module, kinds[0]))
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets")
    model.requires_grad_(False)
    for name, module, kind in found:
        cls = LoRALinear if isinstance(module, nn.Linear) else LoRAConv2d
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, cls(module, config, sel, kind, generator))
    model.lora_selection = sel  # plain attribute: found in O(1) by weight_set(model, ...)
    return [name for name, _, _ in found]


def merge(model: nn.Module, name: str = "live", multiplier: float = 1.0) -> None:
    """Add set `name` into the base weights. Originals are kept (a copy per layer) so unmerge is exact."""
    for layer in lora_layers(model).values():
        if layer._merged is not None:
            raise RuntimeError("a LoRA set is already merged; unmerge first")
        if layer.weight_scale is not None:
            raise RuntimeError("the base weights are stored in fp8; merge LoRAs before quantizing, or select "
                               "the set with weight_set instead")
        with torch.no_grad():
            original = layer.weight.detach().clone()
            # .to: a swapped block's weight waits in host memory while its sets are on the GPU (block_swap.py)
            merged = original.float() + layer.delta_weight(name).to(original.device) * multiplier
            layer.weight.copy_(merged.to(layer.weight.dtype))
        layer._merged = (name, multiplier, original)


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer._merged is not None:
            with torch.no_grad():
                layer.weight.copy_(layer._merged[2])
            layer._merged = None


def set_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """One set as `{module}.lora_down` (S*r, in) and `{module}.lora_up` (out, r), detached fp32 views (a sharded
    model's are gathered whole: every process must call this together)."""
    out: dict[str, Tensor] = {}
    for module, layer in lora_layers(model).items():
        if name not in layer.lora_down:
            raise KeyError(f"{module} has no materialised set {name!r}")
        out[f"{module}.lora_down"] = full(layer.lora_down[name].detach())
        out[f"{module}.lora_up"] = full(layer.lora_up[name].detach())
    return out


def load_set(model: nn.Module, name: str, state: dict[str, Tensor], strict: bool = True) -> None:
    """Fill set `name` (created if needed, e.g. a teacher LoRA) from a `set_state_dict`-style dict."""
    layers = lora_layers(model)
    expected = {f"{m}.lora_{p}" for m in layers for p in ("down", "up")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if strict and (missing or unexpected):
        raise KeyError(f"set {name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for module, layer in layers.items():
        for part, store in (("down", layer.lora_down), ("up", layer.lora_up)):
            key = f"{module}.lora_{part}"
            if key not in state:
                continue
            shape = tuple(layer.lora_down["live"].shape if part == "down" else layer.lora_up["live"].shape)
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)}, expected {shape}")
            t = state[key].detach().to(device=layer.weight.device, dtype=torch.float32)
            if name in store:
                with torch.no_grad():
                    store[name].copy_(like(store[name], t))
            else:
                store[name] = nn.Parameter(t.clone(), requires_grad=False)
        layer.zero_sets.discard(name)


def copy_set(model: nn.Module, dst: str, src: str) -> None:
    """dst <- src (e.g. start the EMAs from a teacher LoRA, or restart them from live)."""
    if all(dst in layer.lora_down for layer in lora_layers(model).values()):
        with torch.no_grad():  # tensor to tensor: sharded sets copy shard to shard (no foreach rule for them)
            for d, s in zip(set_tensors(model, dst), set_tensors(model, src), strict=True):
                d.copy_(s)
    else:
        load_set(model, dst, set_state_dict(model, src))


def set_tensors(model: nn.Module, name: str) -> list[Tensor]:
    """The set's tensors in a fixed order (down, up per layer), for foreach updates such as the EMA."""
    layers = lora_layers(model).values()
    return [t for layer in layers for t in (layer.lora_down[name], layer.lora_up[name])]
