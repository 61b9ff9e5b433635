"""DistillConfig from a TOML file and/or `--field value` flags (distill/config.py holds the fields).

Precedence: the dataclass defaults, then the TOML file (`--config FILE`, or a packaged preset name such as
`flux-dev-scfm`), then flags. A file may put a field under any table (`[lora]`, `[optim]`, ...): it reads by its
flat name. A top-level `base = "demo"` starts from that file or preset and changes only what follows
(`distill/configs/demo-10shot.toml`).

Where a `base` points (`_base_path`), so that a file reads the same from any folder:
- in a packaged preset: always the packaged preset of that name (distill/configs/NAME.toml), never a file in the
  current folder;
- in the user's file: a relative path from that file's folder (not the current one), an absolute path as it is;
  else a packaged preset of that name, `.toml` or not (`base = "demo"` and `base = "demo.toml"` alike, unless a
  file of that name sits next to it).
`--config NAME` itself is the user's: a file (relative to the current folder), else a preset of that name (also
past a folder of that name: a folder is never a config).
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

from sampling.fields import check_fields
from weights.family import Family

from .config import FLOAT_RANGES, FLOW_MATCHING_OWN, ConfigError, DistillConfig, flat_fields, range_error

PRESETS = Path(__file__).parent / "configs"


def _flatten(table: dict, source: str) -> dict:
    out: dict = {}
    for key, value in table.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise ConfigError(f"{source}: [{key}.{k}] nests too deep; use one level of tables")
            if k in out:
                raise ConfigError(f"{source}: field {k!r} is set twice")
            out[k] = v
    return out


def resolve_config_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    preset = PRESETS / f"{name.removesuffix('.toml')}.toml"
    if preset.exists():  # also past a folder of that name (a run's `demo/`): a folder is never a config
        return preset
    if path.is_dir():
        raise ConfigError(f"--config {name} is a folder, not a TOML file; pass a .toml file or a preset name")
    if path.exists():  # not a regular file (a fifo, /dev/stdin): read as it is
        return path
    raise ConfigError(f"--config {name}: no such file, and not a preset name ({', '.join(presets())})")


def _base_path(base: str, file: Path) -> Path:
    """The file `base = "..."` in `file` names (the rule in the module docstring)."""
    where = f"base {base!r} (in {file})"
    preset = PRESETS / f"{base.removesuffix('.toml')}.toml"
    if file.resolve().parent == PRESETS.resolve():  # a packaged preset: its base is one too, whatever the cwd
        if preset.exists():
            return preset
        raise ConfigError(f"{where}: not a preset name ({', '.join(presets())})")
    path = file.parent / Path(base).expanduser()  # an absolute base stays as it is
    named = preset.exists() and Path(base).name == base
    if path.is_dir() and not named:  # a folder is never a config: beside a preset's name (a demo/ run), the preset
        raise ConfigError(f"{where} is a folder, not a TOML file; name a .toml file or a preset there")
    if path.is_file() and not (named and path.resolve() == file.resolve()):  # a user's demo.toml on the preset
        return path
    if named:
        return preset
    raise ConfigError(f"{where}: no such file next to it ({path}), and not a preset name ({', '.join(presets())}); "
                      "fix the base there")


def load_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The flat fields of the TOML file or preset `path` (a `--config`), over its base's. `_seen`: the files
    whose base led here (already resolved: `_base_path`)."""
    path = Path(path) if _seen else resolve_config_path(str(path))
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its `base` chain comes back to itself ({' -> '.join(map(str, _seen))})")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        what = f"base {path}" if _seen else f"--config {path}"
        raise ConfigError(f"{what} is not UTF-8 text (a binary file?); pass a .toml file") from None
    except OSError as e:
        what = f"base {path}" if _seen else f"--config {path}"
        raise ConfigError(f"{what} cannot be read ({e.strerror}); check its permissions") from None
    base = table.pop("base", None)
    values = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a file or preset name, got {base!r}")
        values = load_toml(_base_path(base, path), (*_seen, path.resolve()))
    return values | check_fields(DistillConfig, _flatten(table, str(path)), str(path), ConfigError)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def recipe_cfg_scale(family: Family) -> tuple[float, str]:
    """The cfg_scale of `family`'s packaged recipe (the presets whose targets are its own: SD3.5's 3.5, klein base's
    3, none for FLUX.1) and the first preset that says it; (0.0, "") for a family no preset targets (one registered
    at run time). What a run takes when no flag, file or resumed run sets cfg_scale (run_setup.with_recipe_cfg), so
    the family record and its preset decide, not a family name here. Presets that disagree are refused."""
    fields = flat_fields()
    found = {}
    for name in presets():  # by path: a file named like a preset in the current folder is not the recipe
        table = load_toml(PRESETS / f"{name}.toml")
        if table.get("targets", fields["targets"][0].default) in family.spellings:
            found[name] = float(table.get("cfg_scale", fields["cfg_scale"][0].default))
    if len(set(found.values())) > 1:
        said = ", ".join(f"{name} {w:g}" for name, w in found.items())
        raise ConfigError(f"the packaged {family.display} presets disagree on cfg_scale ({said}); pass --cfg_scale "
                          "or --config")
    return next(((w, name) for name, w in found.items()), (0.0, ""))


def build_config(file: str | None = None, overrides: dict | None = None, base: dict | None = None) -> DistillConfig:
    """`base` (flat names: a resumed run's own settings), under the TOML `file`, under `overrides` (flags)."""
    values = dict(base or {})
    values.update(load_toml(file) if file else {})
    flags = check_fields(DistillConfig, overrides or {}, "command line", ConfigError)
    for name in (n for n in flags if n in FLOAT_RANGES):
        # a flag's "default": what the run has without it, the file's (the demo's lr 0.001, not the field's 2e-05)
        default = values.get(name, flat_fields()[name][0].default)
        if (refused := range_error(name, flags[name], default)) is not None:
            raise ConfigError(refused)
    values.update(flags)
    return DistillConfig.from_flat(**values | _flow_matching_own(values, flags))


# what flow_matching never reads, refused as flags (a file's stay: every preset sets them). t_skip, the teacher
# steps and teacher_ratio still pick each element's grid and so its sigma: not here
FLOW_MATCHING_IDLE = ("fast_decay", "slow_decay", "ema_restart_every", "non_shortcut_ratio")


def _flow_matching_own(values: dict, flags: dict) -> dict:
    """objective flow_matching trains the live set alone, without CFG: an export_set or cfg_scale of a file or
    preset (every packaged recipe exports the slow EMA) gives way to its own, with one line saying so; a flag
    stays, and DistillConfig refuses it. The flags it would ignore (FLOW_MATCHING_IDLE) are refused."""
    if values.get("objective") != "flow_matching":
        return {}
    idle = [k for k in FLOW_MATCHING_IDLE if k in flags]
    if idle:
        raise ConfigError(f"{idle[0]}: objective flow_matching keeps no EMAs and gives every element the plain "
                          f"target, so it would do nothing; drop --{idle[0]}")
    own = {k: v for k, (v, _) in FLOW_MATCHING_OWN.items() if k not in flags and values.get(k, v) != v}
    if own:
        said = ", ".join(f"{k} {v!r} (not the config's {values[k]!r})" for k, v in own.items())
        warnings.warn(f"objective flow_matching trains the live set alone, without CFG: {said}", stacklevel=3)
    return own
