"""Typed, validated run configuration: YAML file + dotted command-line overrides, parsed by
jsonargparse (the library under LightningCLI).

The recipe's own sections (``data``, ``model``, ``train``) are dataclasses: jsonargparse checks
their types, rejects unknown keys and keeps the documented defaults of a section given in part,
without importing torch, so a typo is reported at once. The ``trainer`` section is EVERY argument
of ``lightning.Trainer`` (``gradient_clip_val``, ``accumulate_grad_batches``, ``logger``, ...),
read from Lightning's own signature by ``add_class_arguments``, as LightningCLI does; it is
checked second, since that needs Lightning. ``trainer.max_epochs`` means what it means in
Lightning: the most epochs this run trains (both stages together). Errors become one
:class:`ConfigError` line naming the key. The resolved config is written next to each run's
outputs (``config.yaml``), and a run can be reproduced from it alone.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

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
    interpolate: float = 1.0  # share of the fine-tuned weights kept; the rest from where fine-tuning started (WiSE-FT)


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: Any = None  # a Namespace of lightning.Trainer's arguments (trainer_parser), filled by load_config
    output_dir: str = "runs"
    run_name: str = ""  # "" = a timestamped name
    seed: int = 42


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
        "model.image_size": cfg.model.image_size,
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
    if cfg.trainer is not None and (cfg.trainer.max_epochs or 0) < 0:
        raise ConfigError(f"trainer.max_epochs: must be >= 0 (or null: the stages' own epochs), got {cfg.trainer.max_epochs}")
    if not 0.0 <= cfg.train.interpolate <= 1.0:
        raise ConfigError(f"train.interpolate: must be in [0, 1] (1 = the fine-tuned weights as they are), "
                          f"got {cfg.train.interpolate}")
    if not 0.0 <= cfg.train.label_smoothing < 0.5:
        raise ConfigError(f"train.label_smoothing: must be in [0, 0.5), got {cfg.train.label_smoothing}")


# ---- the parsers ---------------------------------------------------------------------------
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
# the keys outside the sections (types and defaults: the Config dataclass's own fields)
TOP_LEVEL = {"output_dir": "the folder under which every run gets its own folder",
             "run_name": "the run's folder name ('' = a timestamp); --resume needs it",
             "seed": "seed of everything (weights init, augmentation, loaders)"}
# lightning.Trainer's argument names (lightning==2.6.6, a test keeps this equal to the installed
# signature): a misspelt trainer key is named at once, without importing Lightning for it
TRAINER_ARGS = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval",
    "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing",
    "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode", "use_distributed_sampler",
    "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm", "reload_dataloaders_every_n_epochs",
    "default_root_dir", "enable_autolog_hparams", "model_registry",
)
# the recipe sets these on every Trainer it builds (its checkpoints, history, progress bar)
TRAINER_OWNED = {"callbacks", "plugins", "default_root_dir", "enable_checkpointing"}
# defaults that differ from Lightning's: one device unless asked (Lightning's "auto" takes every
# GPU), no sanity validation pass, the project's own model summary file
TRAINER_DEFAULTS = {"devices": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 10, "enable_model_summary": False}


def _parser(prog: str = "python train.py"):
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, exit_on_error=False, allow_abbrev=False)


def sections_parser():
    """``data``/``model``/``train`` and the top-level keys (torch-free); ``trainer`` is taken as a
    mapping here and checked by :func:`trainer_parser`."""
    p = _parser()
    for name, cls in SECTIONS.items():
        p.add_argument(f"--{name}", type=cls, default=cls(), help=(cls.__doc__ or "").strip())
    p.add_argument("--trainer", type=dict, default={}, help="lightning.Trainer arguments (see trainer_parser)")
    fields, hints = {f.name: f for f in dataclasses.fields(Config)}, typing.get_type_hints(Config)
    for name, text in TOP_LEVEL.items():
        p.add_argument(f"--{name}", type=hints[name], default=fields[name].default, help=text)
    return p


@functools.lru_cache(maxsize=1)
def trainer_parser():
    """Every ``lightning.Trainer`` argument under ``trainer.``, typed and documented from Lightning's
    own signature (imports Lightning)."""
    import lightning as L

    p = _parser()
    p.add_class_arguments(L.Trainer, "trainer", skip=TRAINER_OWNED, fail_untyped=False)
    p.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})
    return p


def config_help(width: int = 100) -> str:
    """Every key with its type and default, from the parsers themselves (``train.py --help`` and
    ``docs/configuration.md``): the recipe's sections, then every ``lightning.Trainer`` argument."""
    import os

    def body(text: str) -> str:  # the option groups, without argparse's long usage block
        text = text[text.index("\noptions:") + 1:]
        return "\n\n".join(block for block in text.split("\n\n")
                            if not block.startswith("options:\n  -h, --help") or "--output_dir" in block)

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal; the docs need one width
    try:
        sections = body(sections_parser().format_help())
        trainer = body(trainer_parser().format_help())
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    sections = re.sub(r"  --trainer TRAINER .*?\n(?=  --)", "", sections, flags=re.S)
    sections = sections.replace("  -h, --help            Show this help message and exit.\n", "")
    return f"{sections.rstrip()}\n\n{trainer.rstrip()}\n"


def _message(exc: Exception) -> str:
    """jsonargparse's error as one line that names the key."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    m = re.match(r"Group '([\w.]+)' does not accept option '([\w.]+)'", text)
    if m:
        return _unknown(f"{m.group(1)}.{m.group(2)}")
    m = re.match(r"(?:Option|Key) '([\w.]+)' is not (?:accepted|expected)", text)
    if m:
        return _unknown(m.group(1))
    m = re.match(r"unrecognized arguments: --([\w.]+)", text)
    if m:
        return _unknown(m.group(1))
    m = re.match(r'Parser key "([\w.]+)": (.*)', text)
    if m:
        return f"{m.group(1)}: {_reason(m.group(2))}"
    return text


def _reason(text: str) -> str:
    """jsonargparse's type complaint, shortened: ``expected int, got 'big'``."""
    given = re.search(r"Given value: (.*)$", text) or re.search(r"Got value: (.*)$", text)
    got = given.group(1).strip() if given else "?"
    if "Union subtypes" in text:
        head = text.split("Errors:")[0]
        arms = re.findall(r"<class '([\w.]+)'>|(typing\.Literal\[[^\]]*\])", head)
        names = [lit.replace("typing.Literal", "one of ") if lit else ("null" if a == "NoneType" else a.rsplit(".", 1)[-1])
                 for a, lit in dict.fromkeys(arms)]
        return f"expected {' or '.join(names) or 'another type'}, got {got!r}"
    m = re.match(r"Expected a <class '([\w.]+)'>", text)
    if m:
        return f"expected {m.group(1)}, got {got!r}"
    m = re.match(r"Expected a typing\.Literal\[(.*?)\]", text)
    if m:
        return f"{got!r} is not one of [{m.group(1)}]"
    return text


def _unknown(key: str) -> str:
    """``unknown config key 'a.b'`` and the keys valid there (dataclass sections: torch-free)."""
    parts = key.split(".")
    if parts[0] == "trainer" and len(parts) == 2 and parts[1] in TRAINER_OWNED:
        return (f"trainer.{parts[1]} is set by the recipe (its checkpoints, early stopping, history and "
                "checkpoint writer) and cannot be configured")
    node: Any = Config
    for part in parts[:-1]:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        node = hints.get(part)
    if dataclasses.is_dataclass(node):
        names = sorted(f.name for f in dataclasses.fields(node))
        return f"unknown config key '{key}' (valid keys here: {', '.join(names)})"
    return f"unknown config key '{key}' (python train.py --help lists every key)"


def _cli_value(dotted: str, raw: str) -> str:
    """A list key also takes ``a,b`` (as well as ``[a, b]``); every other value goes as written."""
    tp = _annotation(dotted)
    if get_origin(tp) is list and not raw.lstrip().startswith("["):
        parts = [part.strip() for part in raw.split(",")] if raw.strip() else []
        return "[" + ", ".join(yaml.safe_dump(part, default_flow_style=True).strip().removesuffix("...").strip()
                               if get_args(tp)[0] is str else part for part in parts) + "]"
    return raw


def from_dict(values: dict, overrides: list[tuple[str, str]] | None = None) -> Config:
    """Build and validate a :class:`Config` from a (nested) mapping plus ``--key value`` overrides."""
    from jsonargparse import ArgumentError

    values = {k: v for k, v in (values or {}).items() if v is not None}  # `data:` left empty = defaults
    for key in values:
        if key not in {*SECTIONS, "trainer", *TOP_LEVEL}:
            raise ConfigError(_unknown(str(key)))
    trainer_values = values.pop("trainer", {})
    if not isinstance(trainer_values, dict):
        raise ConfigError(f"trainer: expected a mapping of lightning.Trainer arguments, got {trainer_values!r}")
    section_args, trainer_args = [], []
    for key, raw in overrides or []:
        if key == "trainer" or key.startswith("trainer."):
            trainer_args.append(f"--{key}={raw}")
        else:
            section_args.append(f"--{key}={_cli_value(key, raw)}")
    given = [*trainer_values, *(a[len("--trainer."):].split("=", 1)[0].split(".")[0]
                                for a in trainer_args if a.startswith("--trainer."))]
    for name in given:  # names first, torch-free; their values need Lightning's signature (below)
        if name not in TRAINER_ARGS or name in TRAINER_OWNED:
            raise ConfigError(_unknown(f"trainer.{name}"))
    p = sections_parser()
    try:
        ns = p.parse_object(values) if values else p.get_defaults()
        ns = p.instantiate(p.parse_args(section_args, namespace=ns))
    except (ArgumentError, TypeError, ValueError) as exc:
        raise ConfigError(_message(exc)) from None
    tp = trainer_parser()
    try:
        tns = tp.parse_object({"trainer": trainer_values}) if trainer_values else tp.get_defaults()
        tns = tp.parse_args(trainer_args, namespace=tns)
    except (ArgumentError, TypeError, ValueError) as exc:
        raise ConfigError(_message(exc)) from None
    if tns.trainer.max_epochs == 0:  # configs written by 0.2 (and run folders' config.yaml) meant "no cap"
        tns.trainer.max_epochs = None
    if isinstance(tns.trainer.devices, str) and tns.trainer.devices.isdigit():
        tns.trainer.devices = int(tns.trainer.devices)  # "2" and 2 mean the same to Lightning; keep one form
    cfg = Config(data=ns.data, model=ns.model, train=ns.train, trainer=tns.trainer,
                 **{k: ns[k] for k in TOP_LEVEL})
    _validate(cfg)
    return cfg


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``trainer`` section as ``lightning.Trainer`` keyword arguments, objects instantiated
    (``logger: {class_path: ..., init_args: ...}`` becomes the logger)."""
    tp = trainer_parser()
    from jsonargparse import Namespace

    return tp.instantiate(Namespace(trainer=cfg.trainer), instantiate_groups=False).trainer.as_dict()


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


def _annotation(dotted: str) -> Any:
    """The type annotation of a dotted key (``None`` when there is no such key)."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


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
