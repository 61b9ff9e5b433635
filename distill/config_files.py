"""DistillConfig from a TOML file and/or `--field value` flags (distill/config.py holds the fields).

Precedence: the dataclass defaults, then the TOML file (`--config FILE`, or a packaged preset name such as
`flux-dev-scfm`), then flags. A file may put a field under any table (`[lora]`, `[optim]`, ...): it reads by its
flat name. A top-level `base = "demo"` starts from that file or preset and changes only what follows
(`distill/configs/demo-10shot.toml`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from sampling.fields import check_fields

from .config import ConfigError, DistillConfig

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
    if path.is_dir():
        raise ConfigError(f"--config {name} is a folder, not a TOML file; pass a .toml file or a preset name")
    if path.exists():
        return path
    preset = PRESETS / f"{name.removesuffix('.toml')}.toml"
    if preset.exists():
        return preset
    raise ConfigError(f"--config {name}: no such file, and not a preset name ({', '.join(presets())})")


def load_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = resolve_config_path(str(path))
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its `base` chain comes back to itself ({' -> '.join(map(str, _seen))})")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text (a binary file?); pass a .toml file") from None
    except OSError as e:
        raise ConfigError(f"--config {path} cannot be read ({e.strerror}); check its permissions") from None
    base = table.pop("base", None)
    values = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a file or preset name, got {base!r}")
        values = load_toml(base if Path(base).is_absolute() or base in presets() else path.parent / base,
                           (*_seen, path.resolve()))
    return values | check_fields(DistillConfig, _flatten(table, str(path)), str(path), ConfigError)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def build_config(file: str | None = None, overrides: dict | None = None, base: dict | None = None) -> DistillConfig:
    """`base` (flat names: a resumed run's own settings), under the TOML `file`, under `overrides` (flags)."""
    values = dict(base or {})
    values.update(load_toml(file) if file else {})
    values.update(check_fields(DistillConfig, overrides or {}, "command line", ConfigError))
    return DistillConfig.from_flat(**values)
