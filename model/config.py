"""The behaviour every model config shares: named presets and a JSON-safe dict form."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class PresetConfig:
    """Mixin for frozen config dataclasses; each sets `PRESETS` (name -> config) after defining them."""

    PRESETS: ClassVar[dict] = {}
    FAMILY: ClassVar[str] = "model"

    @classmethod
    def preset(cls, name: str):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.FAMILY} preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls.PRESETS[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Unknown keys are ignored (files written by newer versions); JSON lists become the tuples they were."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})
