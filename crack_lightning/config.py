"""Typed, validated run configuration: YAML file + dotted command-line overrides.

Modelled on LightningCLI's ``--config`` / ``--section.key value`` / ``--print_config``
but kept to plain dataclasses so that every error names the offending key and
no traceback reaches the user. The resolved config is written next to each
run's outputs (``config.yaml``), and a run can be reproduced from it alone.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError  # noqa: F401 - re-exported: callers import it from here too


@dataclass
class DataConfig:
    """Where the images are and how they are split and loaded."""

    root: str = "data/sample"
    class_names: list[str] = field(default_factory=lambda: ["Negative", "Positive"])  # [no crack, crack]
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    batch_size: int = 32
    num_workers: int = 2
    prefetch_factor: int = 2
    bad_images: Literal["skip", "error"] = "skip"
    max_per_class: int = 0  # 0 = all; >0 takes a seeded subset per class (quick experiments)
    augment: Literal["none", "light", "strong", "site"] = "light"
    # more data roots beside `root` (class folders, or annotated photos: images/ + masks/); each is a source
    extra_roots: list[str] = field(default_factory=list)
    balance_sources: bool = False  # training draws every source equally often (a 30,000-patch set cannot drown 700 photos)
    # annotated photos -> labelled tiles (crack_lightning.tiles): tile sizes in pixels, the crack rule, photo groups
    tile_sizes: list[int] = field(default_factory=lambda: [224, 112])
    tile_crack_fraction: float = 0.005
    tile_clear_margin: int = 8
    group_pattern: str = ""  # regex naming the original photo of a crop (default: name without trailing _<n>)


@dataclass
class ModelConfig:
    """Backbone, where its weights come from, and the head."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: Literal["timm", "lite0", "none"] = "lite0"
    weights_file: str | None = None
    drop_rate: float = 0.2
    image_size: int = 0  # 0 = the backbone's own input size from timm's data config
    head_hidden: int = 0  # 0 = a linear head; > 0 = one hidden layer of this width (MLP head)


@dataclass
class StageConfig:
    """One training stage. ``epochs: 0`` switches the stage off."""

    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3


@dataclass
class TrainConfig:
    """The two-stage transfer-learning recipe (frozen backbone, then fine-tuning)."""

    frozen: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, lr=1e-3))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(epochs=0, lr=1e-4))
    cache_features: bool = False  # frozen stage: run the backbone once, train the head on stored features
    feature_engine: Literal["auto", "torch", "onnx"] = "auto"  # auto: ONNX Runtime on CPU, PyTorch on GPU
    feature_views: int = 0  # cached features: extra augmented views (data.augment) of every training image
    label_smoothing: float = 0.0
    monitor: Literal["val_loss", "val_f1", "val_acc"] = "val_loss"
    threshold_rule: Literal["f1", "fpr", "fixed"] = "f1"  # how the decision threshold is chosen on validation
    target_fpr: float = 0.001  # threshold_rule fpr: lowest threshold with validation false-positive rate <= this


@dataclass
class TrainerConfig:
    """Arguments passed through to ``lightning.Trainer``."""

    accelerator: str = "auto"
    max_epochs: int = 0  # > 0 caps the epochs of every stage (quick runs: --trainer.max_epochs 3)
    devices: Union[int, str] = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    log_every_n_steps: int = 10
    limit_train_batches: Union[int, float] = 1.0
    limit_val_batches: Union[int, float] = 1.0
    limit_test_batches: Union[int, float] = 1.0
    deterministic: bool = False
    enable_progress_bar: bool = True
    max_time: Union[str, None] = None  # "DD:HH:MM:SS": each stage stops there and the run goes on to its test


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs"
    run_name: str = ""  # "" = a timestamped name
    seed: int = 42


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where lossless."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arm,) = get_args(tp)
        return [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # --run_name 2024
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def describe_keys(node: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(--key, type, default)`` for every key of the config, in order (``train.py --help``)."""
    node = Config() if node is None else node
    hints = typing.get_type_hints(type(node))
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += describe_keys(value, f"{prefix}{f.name}.")
        else:
            out.append((f"--{prefix}{f.name}", _type_name(hints[f.name]), repr(value) if value != "" else '""'))
    return out


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys here: {', '.join(sorted(names))})")
    defaults = cls()
    kwargs = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            # a section given in part keeps the documented defaults of the keys it leaves out
            # (train.finetune: {epochs: 2} keeps fine-tuning's lr 1e-4, not StageConfig's 1e-3)
            given = _build(hints[k], v, f"{prefix}{k}.")
            v = dataclasses.asdict(getattr(defaults, k)) | {name: _plain(getattr(given, name)) for name in v}
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _validate(cfg: Config) -> None:
    d = cfg.data
    if len(d.class_names) != 2 or len(set(d.class_names)) != 2:
        raise ConfigError(f"data.class_names: need two different names [no-crack, crack], got {d.class_names}")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"data.{key}: must be in [0, 1), got {v}")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must leave images for training (< 1)")
    positive = {
        "data.batch_size": d.batch_size, "data.prefetch_factor": d.prefetch_factor,
        "train.frozen.lr": cfg.train.frozen.lr, "train.finetune.lr": cfg.train.finetune.lr,
    }
    for key, v in positive.items():
        if not v > 0:  # also refuses NaN
            raise ConfigError(f"{key}: must be > 0, got {v}")
    floats = {"train.frozen.lr": cfg.train.frozen.lr, "train.finetune.lr": cfg.train.finetune.lr,
              "train.frozen.weight_decay": cfg.train.frozen.weight_decay,
              "train.finetune.weight_decay": cfg.train.finetune.weight_decay}
    for key, v in floats.items():
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{key}: must be a finite number >= 0, got {v}")
    if not 0 <= cfg.model.head_hidden <= 65536:
        raise ConfigError(f"model.head_hidden: must be 0 (linear head) to 65536, got {cfg.model.head_hidden}")
    if not 0.0 <= cfg.model.drop_rate < 1.0:
        raise ConfigError(f"model.drop_rate: must be in [0, 1), got {cfg.model.drop_rate}")
    if cfg.model.image_size and not 16 <= cfg.model.image_size <= 4096:
        raise ConfigError(f"model.image_size: must be 0 (the backbone's own) or 16-4096, got {cfg.model.image_size}")
    non_negative = {
        "data.num_workers": d.num_workers, "data.max_per_class": d.max_per_class,
        "train.frozen.epochs": cfg.train.frozen.epochs, "train.finetune.epochs": cfg.train.finetune.epochs,
        "model.image_size": cfg.model.image_size, "trainer.max_epochs": cfg.trainer.max_epochs,
        "train.feature_views": cfg.train.feature_views,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if not d.tile_sizes or any(t < 16 for t in d.tile_sizes):
        raise ConfigError(f"data.tile_sizes: need at least one size >= 16 pixels, got {d.tile_sizes}")
    if not 0.0 < d.tile_crack_fraction <= 1.0 or d.tile_clear_margin < 0:
        raise ConfigError("data.tile_crack_fraction must be in (0, 1] and data.tile_clear_margin >= 0")
    if d.group_pattern:
        import re

        try:
            re.compile(d.group_pattern)
        except re.error as exc:
            raise ConfigError(f"data.group_pattern is not a valid regular expression: {exc}") from exc
    name = cfg.run_name
    if name and (name in (".", "..") or "/" in name or "\\" in name or name.startswith("~")):
        raise ConfigError(f"run_name must be a plain folder name (no '/', '..'), got {name!r}")
    if not 0.0 <= cfg.train.target_fpr < 1.0:
        raise ConfigError(f"train.target_fpr: must be in [0, 1), got {cfg.train.target_fpr}")
    if not 0.0 <= cfg.train.label_smoothing < 0.5:
        raise ConfigError(f"train.label_smoothing: must be in [0, 0.5), got {cfg.train.label_smoothing}")


def from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from a (nested) mapping."""
    cfg = _build(Config, values or {})
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


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


def _annotation(dotted: str) -> Any:
    """The type annotation of a dotted key (``None`` when there is no such key)."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _parse_value(dotted: str, raw: str) -> Any:
    """A command-line value, read for the key's type: text for a text key (``--run_name off`` is
    the name "off", not YAML's false), ``a,b`` or ``[a, b]`` for a list, YAML for the rest
    (``3``, ``1e-4``, ``true``, ``null``)."""
    tp = _annotation(dotted)
    arms = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if set(arms) - {type(None)} == {str} and not (type(None) in arms and raw in ("null", "~")):
        return raw
    if get_origin(tp) is list and not raw.lstrip().startswith("["):
        (arm,) = get_args(tp)
        parts = [part.strip() for part in raw.split(",")] if raw.strip() else []
        return parts if arm is str else [yaml.safe_load(part) for part in parts]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(values: dict, dotted: str, raw: str) -> None:
    """Apply ``--a.b.c VALUE`` (see :func:`_parse_value`)."""
    value = _parse_value(dotted, raw)
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{part}' is not a section")
    node[parts[-1]] = value


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
    """Load ``path`` (or the defaults), apply overrides, validate."""
    values = load_yaml(path) if path else {}
    for key, raw in overrides or []:
        _set_dotted(values, key, raw)
    return from_dict(values)
