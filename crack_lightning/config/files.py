"""Config files: YAML read strictly (no duplicate keys), overrides split, resolved configs written back."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from crack_lightning.config.parser import from_dict
from crack_lightning.config.reader import load_yaml
from crack_lightning.config.schema import SECTIONS, TOP_LEVEL, Config
from crack_lightning.errors import ConfigError


def to_dict(cfg: Config) -> dict:
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    out["trainer"] = cfg.trainer.as_dict() if cfg.trainer is not None else {}
    out.update({k: getattr(cfg, k) for k in TOP_LEVEL})
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ``['--a.b', '1', '--c=2']`` into ``[('a.b', '1'), ('c', '2')]``."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --section.key value)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            i += 1
            value = args[i]
        pairs.append((key, value))
        i += 1
    return pairs


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] | None = None) -> Config:
    """Load ``path`` (or the defaults), apply ``(dotted key, raw value)`` overrides, validate."""
    return from_dict(load_yaml(path) if path else {}, overrides)
