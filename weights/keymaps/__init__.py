"""Declarative key maps between official (BFL / SAI) names and diffusers names.

A table is a list of `Rule(official, others, kind)` with `{i}` placeholders, expanded per block. Kinds:
- `same`:  one tensor, renamed;
- `fuse`:  several diffusers tensors stacked along dim 0 into one official tensor (qkv, Flux `linear1`);
- `swap`:  the two halves of dim 0 exchanged (adaLN (shift, scale) official vs (scale, shift) diffusers).
The same tables drive checkpoint loading, conversion and LoRA key mapping, so no mapping exists twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rule:
    official: str
    others: tuple[str, ...]
    kind: str = "same"  # same | fuse | swap

    def __post_init__(self):
        if self.kind not in ("same", "fuse", "swap"):
            raise ValueError(f"unknown rule kind {self.kind!r}")
        if (self.kind == "fuse") != (len(self.others) > 1):
            raise ValueError(f"rule for {self.official}: only `fuse` takes several source keys")


def expand(table: list[tuple[str, str, tuple[str, ...], str]], counts: dict[str, int]) -> list[Rule]:
    """Expand (block kind or "", official, others, kind) rows; `counts` gives the number of blocks per kind."""
    rules: list[Rule] = []
    for block, official, others, kind in table:
        indices = range(counts[block]) if block else [None]
        for i in indices:
            fmt = (lambda s: s.replace("{i}", str(i))) if i is not None else (lambda s: s)
            rules.append(Rule(fmt(official), tuple(fmt(o) for o in others), kind))
    return rules


def tables(modules: list[tuple[str, str, tuple[str, ...], str, tuple[tuple[str, str], ...]]]) -> tuple[list, list]:
    """(parameter rows, module rows) of a module table whose rows are (block kind, official module, diffusers
    module(s), kind, (official param, diffusers param) pairs): the first drives checkpoints, the second LoRAs."""
    params = [(block, f"{off}.{po}", tuple(f"{o}.{pd}" for o in others), kind)
              for block, off, others, kind, pairs in modules for po, pd in pairs]
    return params, [(block, off, others, kind) for block, off, others, kind, _ in modules]


def double_single_rules(table: list, depth: int, depth_single_blocks: int, guidance_embed: bool) -> list[Rule]:
    """A FLUX-style table (block kinds "double", "single" and "guidance": the guidance embedder, kept only for
    models that have one) expanded for a model shape."""
    rows = [("" if b == "guidance" else b, *rest) for b, *rest in table if guidance_embed or b != "guidance"]
    return expand(rows, {"double": depth, "single": depth_single_blocks})


def swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def to_official(rules: list[Rule], get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield (official key, tensor), reading the diffusers tensors through `get` one rule at a time."""
    for rule in rules:
        if rule.kind == "fuse":
            yield rule.official, torch.cat([get(k) for k in rule.others], dim=0)
        elif rule.kind == "swap":
            yield rule.official, swap_halves(get(rule.others[0]))
        else:
            yield rule.official, get(rule.others[0])


def to_others(
    rules: list[Rule], get: Callable[[str], Tensor], split_sizes: Callable[[Rule, Tensor], list[int]]
) -> Iterator[tuple[str, Tensor]]:
    """Yield (diffusers key, tensor) from official tensors; `split_sizes` gives the row split of a fused tensor."""
    for rule in rules:
        t = get(rule.official)
        if rule.kind == "fuse":
            yield from zip(rule.others, torch.split(t, split_sizes(rule, t), dim=0))
        elif rule.kind == "swap":
            yield rule.others[0], swap_halves(t)
        else:
            yield rule.others[0], t


def official_shapes(rules: list[Rule], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The official keys' shapes implied by diffusers `shapes`, from the header alone (no tensor read)."""
    out: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        if not all(k in shapes for k in rule.others):
            continue  # reported as a missing key by the caller
        first = tuple(shapes[rule.others[0]])
        if rule.kind == "fuse":
            out[rule.official] = (sum(shapes[k][0] for k in rule.others),) + first[1:]
        else:
            out[rule.official] = first
    return out
