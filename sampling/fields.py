"""Dataclass fields as flags and config-file values: one flag per field with its help, and the check that a
value from a file or a command line has the field's type. `python -m distill.train` builds its parser and reads
its TOML files with these (distill/config.py); a sub-config (a field whose type is a dataclass) gives its
fields in its place, under their own names."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import field


def opt(default, help: str, parse=None, **flag):
    """A field with its help text; `parse` reads the field's text on the command line and in files (e.g. 'auto').
    `flag`, for the flags alone: choices, metavar, repeat (a repeatable flag, each use adding one value),
    hidden (accepted, not listed in --help)."""
    return field(default=default, metadata={"help": help, "parse": parse, **flag})


def field_index(cls) -> dict[str, tuple[dataclasses.Field, type]]:
    """name -> (field, its type) for every field of `cls`, a sub-config's fields in its place (names unique)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[dataclasses.Field, type]] = {}
    for f in dataclasses.fields(cls):
        inner = field_index(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else {f.name: (f, hints[f.name])}
        clash = out.keys() & inner.keys()
        if clash:
            raise TypeError(f"{cls.__name__}: field names {sorted(clash)} appear twice")
        out |= inner
    return out


def base_type(tp) -> type:
    """`float | None` -> float, `tuple[str, ...]` -> tuple; plain types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, *, defaults: bool = False, spell: str = "_",
                       also: tuple[str, dict] = ("", {})) -> None:
    """One flag per field, named as the field (`--t_skip`) or with `spell="-"` hyphenated (`--blocks-to-swap`);
    sampling/options.py OneLineParser takes both spellings either way.

    defaults=False (train's config fields): each flag defaults to SUPPRESS, so an unset flag keeps the config
    file's value; values are checked and parsed afterwards (check_fields); --help shows the field's default.
    defaults=True (the sampling commands): each flag carries its field's default and parses its value itself; a
    False bool is a switch (`--fp8`), a True one gets its `--no-` form.

    A tuple field's flag repeats: each use adds its values (`Accumulate`).
    also=(label, values): the values some runs start from instead (train's demo preset), shown after the field's
    default where they differ: `[10000; demo 500]`."""
    for f, hint in field_index(cls).values():
        tp, meta = base_type(hint), f.metadata
        flags = [f"--{f.name.replace('_', spell)}"]
        label, values = also
        other = values.get(f.name, f.default)
        shown = f"{f.default!r}" + (f"; {label} {other!r}" if other != f.default else "")
        text = meta.get("help", "") if defaults else f"{meta.get('help', '')} [{shown}]"
        default = (list(f.default) if meta.get("repeat") else f.default) if defaults else argparse.SUPPRESS
        kw = {"dest": f.name, "default": default, "help": argparse.SUPPRESS if meta.get("hidden") else text}
        kw |= {k: meta[k] for k in ("choices", "metavar") if meta.get(k) is not None}
        if meta.get("repeat"):
            parser.add_argument(*flags, action="append", type=meta.get("parse") or str, **kw)
        elif meta.get("parse"):
            # train reads the text in check_fields; the sampling commands parse it here
            parser.add_argument(*flags, type=meta["parse"] if defaults else str, **{"metavar": "VALUE"} | kw)
        elif tp is bool:
            action = "store_true" if defaults and f.default is False else argparse.BooleanOptionalAction
            parser.add_argument(*flags, action=action, **kw)
        elif tp is tuple:  # `--base_loras A --base_loras B` is both, as repeatable flags are (generate --lora)
            parser.add_argument(*flags, nargs="*", action=Accumulate, **{"metavar": "VALUE"} | kw)
        else:  # choices are listed as argparse writes them, {a,b}
            named = {} if "choices" in kw else {"metavar": tp.__name__.upper()}
            parser.add_argument(*flags, type=tp, **named | kw)


class Accumulate(argparse.Action):
    """A tuple field's flag: each use adds its values (none at all: `--base_loras` alone is the empty tuple). The
    first use replaces the default or the config file's value; argparse's "extend" would add to a default."""

    def __call__(self, parser, namespace, values, option_string=None):
        got = getattr(namespace, self.dest, None)
        # a list is this flag's own from an earlier use; anything else (a default tuple, SUPPRESS's absence) is not
        setattr(namespace, self.dest, (got if isinstance(got, list) else []) + list(values))


def check_fields(cls, values: dict, source: str, error: type[Exception] = ValueError) -> dict:
    """`values` by field name, each parsed (a field's `parse`) and checked against its type: an int where a
    float is asked is taken, a list where a tuple is. An unknown name or a wrong type raises `error`, one line
    naming `source`."""
    index = field_index(cls)
    names = list(index)
    out = {}
    for key, value in values.items():
        if key not in index:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{source}: unknown field {key!r}{hint}")
        f, hint = index[key]
        if f.metadata.get("parse") and not isinstance(value, bool):
            value = f.metadata["parse"](value)
        tp = base_type(hint)
        if tp is tuple and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise error(f"{source}: field {key!r} needs a {tp.__name__}, got {value!r}")
        out[key] = value
    return out
