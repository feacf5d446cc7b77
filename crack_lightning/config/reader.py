"""Reading YAML for a config, within bounds: size, nesting and aliases checked while the document is
composed, keys given twice refused, so no file or command-line value can exhaust memory or recursion."""
from __future__ import annotations

from pathlib import Path

import yaml

from crack_lightning.errors import ConfigError
from crack_lightning.limits import (
    CONFIG_MAX_ALIASES,
    CONFIG_MAX_BYTES,
    CONFIG_MAX_DEPTH,
)


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses, while composing (before anything is built), a document nested deeper than
    :data:`~crack_lightning.limits.CONFIG_MAX_DEPTH` or with more than ``CONFIG_MAX_ALIASES`` aliases: an
    alias bomb or a 3,000-deep nesting is one clear error, not a MemoryError or RecursionError."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > CONFIG_MAX_ALIASES:
                raise ConfigError(f"more than {CONFIG_MAX_ALIASES} YAML aliases (*name): refusing what could "
                                  "expand without bound")
        self._depth += 1
        if self._depth > CONFIG_MAX_DEPTH:
            raise ConfigError(f"nested deeper than {CONFIG_MAX_DEPTH} levels: not a config")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def check_yaml_value(text: str, where: str) -> None:
    """A YAML value from the command line, within the same bounds as a config file (composed, not built)."""
    if len(text) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{where}: the value is longer than {CONFIG_MAX_BYTES:,} characters")
    try:
        yaml.compose(text, Loader=BoundedLoader)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError:
        pass  # not YAML: the parser takes it as a plain string


class _UniqueKeyLoader(BoundedLoader):
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
        if path.stat().st_size > CONFIG_MAX_BYTES:
            raise ConfigError(f"{path} is larger than {CONFIG_MAX_BYTES:,} bytes: not a config file")
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") if not str(exc).startswith(str(path)) else exc from None
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
