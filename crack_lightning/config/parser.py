"""The parsers behind ``train.py``: the recipe's sections and every ``lightning.Trainer`` argument, typed and
documented from their signatures (jsonargparse, as LightningCLI does); their errors as one line naming the key."""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from crack_lightning.config.reader import check_yaml_value, load_yaml
from crack_lightning.config.schema import SECTIONS, TOP_LEVEL, Config, _validate
from crack_lightning.errors import ConfigError


@functools.lru_cache(maxsize=1)
def trainer_argument_names() -> tuple[str, ...]:
    """``lightning.Trainer``'s argument names, read from the installed Lightning's source (its
    ``__init__`` signature) without importing it: a misspelt ``trainer.*`` key is reported before
    torch is imported."""
    import ast
    import importlib.util

    package = importlib.util.find_spec("lightning")  # the top-level spec: nothing is imported
    source = Path(package.submodule_search_locations[0]) / "pytorch" / "trainer" / "trainer.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return tuple(a.arg for a in [*init.args.args, *init.args.kwonlyargs] if a.arg != "self")


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
        p.add_argument(f"--{name}", type=cls, default=cls(), help=(cls.__doc__ or "").strip().split("\n\n")[0])
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


TRAINER_HELP = Path(__file__).with_name("trainer_help.txt")  # written by tools/config_reference.py


def _help_versions() -> str:
    """What the Trainer's help text depends on: the first line of :data:`TRAINER_HELP`."""
    from importlib.metadata import version

    return f"# lightning=={version('lightning')} jsonargparse=={version('jsonargparse')}"


def _option_groups(parser, width: int) -> str:
    """A parser's option groups, without argparse's long usage block, wrapped at ``width`` columns."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal; the docs need one width
    try:
        text = parser.format_help()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    text = text[text.index("\noptions:") + 1:]
    return "\n\n".join(block for block in text.split("\n\n")
                        if not block.startswith("options:\n  -h, --help") or "--output_dir" in block).rstrip()


def trainer_help(width: int = 100, cached: bool = True) -> str:
    """Every ``lightning.Trainer`` argument with its type, default and Lightning's own description. The
    text is stored with the package for the Lightning and jsonargparse it was made with, so ``--help``
    needs no Lightning import; with other versions installed it is made afresh (seconds)."""
    if cached and TRAINER_HELP.is_file():
        head, _, text = TRAINER_HELP.read_text(encoding="utf-8").partition("\n")
        if head == _help_versions():
            return text
    return _option_groups(trainer_parser(), width) + "\n"


def config_help(width: int = 100, cached: bool = True) -> str:
    """Every key with its type, default and description, from the parsers themselves (``train.py --help``
    and ``docs/configuration.md``): the recipe's sections, then every ``lightning.Trainer`` argument."""
    sections = _option_groups(sections_parser(), width)
    sections = re.sub(r"  --trainer TRAINER .*?\n(?=  --)", "", sections, flags=re.S)
    sections = sections.replace("  -h, --help            Show this help message and exit.\n", "")
    return f"{sections.rstrip()}\n\n{trainer_help(width, cached)}"


# where each trainer.* key's classes live: a class_path elsewhere is refused before anything is imported
CLASS_KEYS = {"logger": "loggers", "callbacks": "callbacks", "strategy": "strategies", "accelerator": "accelerators",
              "plugins": "plugins", "profiler": "profilers"}


def _check_class_paths(trainer_values: dict, trainer_args: list[str]) -> None:
    """Every ``class_path`` (or dotted class name) given to a ``trainer.*`` key names one of Lightning's
    own classes for that key (``lightning.pytorch.loggers.*`` for the logger, ...): jsonargparse imports
    the module named before it checks the type, and importing runs the module's code."""
    found: list[tuple[str, Any]] = list(trainer_values.items())
    for arg in trainer_args:
        key, _, raw = arg[len("--trainer."):].partition("=")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        found.append((key.split(".")[0], value if key.count(".") == 0 else {key.split(".", 1)[1]: value}))

    def paths(value: Any):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                if k == "class_path":
                    yield str(v)
                elif isinstance(v, (dict, list)):
                    yield from paths(v)
        elif isinstance(value, list):
            for v in value:
                yield from paths(v)

    for key, value in found:
        if key not in CLASS_KEYS:
            continue
        allowed = f"lightning.pytorch.{CLASS_KEYS[key]}."
        for path in paths(value):
            if "." in path and not path.startswith(allowed):
                raise ConfigError(f"trainer.{key}: {path!r} is not one of Lightning's classes for it ({allowed}*): "
                                  "refused before importing anything")


def _logger_save_dir(trainer_values: dict, trainer_args: list[str], output_dir: str | None):
    """A logger given by class alone (``--trainer.logger lightning.pytorch.loggers.CSVLogger``) writes under
    ``output_dir``: most loggers need a ``save_dir`` and none can be guessed from the class."""
    save_dir = str(output_dir or Config.output_dir)

    def filled(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("lightning.pytorch.loggers."):
            value = {"class_path": value}
        if isinstance(value, dict) and "class_path" in value:
            init = dict(value.get("init_args") or {})
            init.setdefault("save_dir", save_dir)
            value = {**value, "init_args": init}
        return value

    if "logger" in trainer_values:
        trainer_values = {**trainer_values, "logger": filled(trainer_values["logger"])}
    args = []
    for arg in trainer_args:
        key, _, raw = arg.partition("=")
        if key == "--trainer.logger" and raw.startswith("lightning.pytorch.loggers.") and \
                not any(a.startswith("--trainer.logger.init_args.save_dir=") for a in trainer_args):
            args += [arg, f"--trainer.logger.init_args.save_dir={save_dir}"]
        else:
            args.append(arg)
    return trainer_values, args


def _check_keys(values: dict, node: Any = Config, prefix: str = "") -> None:
    """Every key of a config mapping names a field of the schema (the dataclasses, torch-free): an unknown
    one is reported with the keys valid there, before jsonargparse sees the mapping."""
    hints = typing.get_type_hints(node)
    for key, value in values.items():
        if not isinstance(key, str) or key not in hints:
            raise ConfigError(_unknown(f"{prefix}{key}"))
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_keys(value, hints[key], f"{prefix}{key}.")


def _message(exc: Exception) -> str:
    """jsonargparse's type complaint as one line that names the key (unknown keys never get this far:
    :func:`_check_keys`)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
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
    _check_keys({k: v for k, v in values.items() if k != "trainer"})
    trainer_values = values.pop("trainer", {})
    if not isinstance(trainer_values, dict):
        raise ConfigError(f"trainer: expected a mapping of lightning.Trainer arguments, got {trainer_values!r}")
    section_args, trainer_args = [], []
    for key, raw in overrides or []:
        check_yaml_value(raw, f"--{key}")
        if key in (*SECTIONS, "trainer"):  # --data FILE.yaml: read here, within bounds, merged like the file's
            section = load_yaml(raw)
            if key == "trainer":
                trainer_values = {**trainer_values, **section}
            else:
                _check_keys({key: section})
                values[key] = {**(values.get(key) or {}), **section}
        elif key.startswith("trainer."):
            trainer_args.append(f"--{key}={raw}")
        else:
            if _annotation(key) is None:
                raise ConfigError(_unknown(key))
            section_args.append(f"--{key}={_cli_value(key, raw)}")
    _check_class_paths(trainer_values, trainer_args)
    trainer_values, trainer_args = _logger_save_dir(trainer_values, trainer_args,
                                                    dict(overrides or []).get("output_dir", values.get("output_dir")))
    given = [*trainer_values, *(a[len("--trainer."):].split("=", 1)[0].split(".")[0]
                                for a in trainer_args if a.startswith("--trainer."))]
    for name in given:  # names first, torch-free; their values need Lightning's signature (below)
        if name not in trainer_argument_names() or name in TRAINER_OWNED:
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
    cfg = Config(**{name: ns[name] for name in SECTIONS}, trainer=tns.trainer,
                 **{k: ns[k] for k in TOP_LEVEL})
    _validate(cfg)
    return cfg


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``trainer`` section as ``lightning.Trainer`` keyword arguments, objects instantiated
    (``logger: {class_path: ..., init_args: ...}`` becomes the logger)."""
    tp = trainer_parser()
    from jsonargparse import Namespace

    return tp.instantiate(Namespace(trainer=cfg.trainer), instantiate_groups=False).trainer.as_dict()


def _annotation(dotted: str) -> Any:
    """The type annotation of a dotted key (``None`` when there is no such key)."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp
