"""Config files: YAML read strictly (no duplicate keys), overrides split, resolved configs written back."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from crack_lightning.config.parser import from_dict
from crack_lightning.config.schema import SECTIONS, TOP_LEVEL, Config
from crack_lightning.errors import ConfigError


def to_dict(cfg: Config) -> dict:
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    out["trainer"] = cfg.trainer.as_dict() if cfg.trainer is not None else {}
    out.update({k: getattr(cfg, k) for k in TOP_LEVEL})
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config key '{key}' appears twice (line {key_node.start_mark.line + 1}): "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a UTF-8 text file (byte {exc.start}): save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


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
