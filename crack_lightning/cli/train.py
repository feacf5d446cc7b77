"""``train.py``: ``--config`` plus dotted overrides (LightningCLI's form), ``--print_config``, ``--resume``."""
from __future__ import annotations

import sys

from crack_lightning.cli.guard import guarded
from crack_lightning.config.files import dump_yaml, load_config, parse_overrides
from crack_lightning.errors import ConfigError

TRAIN_USAGE = """usage: python train.py [--config FILE.yaml] [--print_config] [--resume] [--section.key VALUE ...]

Train, evaluate and save a crack classifier. Any config key can be overridden
with --section.key VALUE, e.g. --data.root DIR --train.frozen.epochs 5 --trainer.devices 2
--trainer.strategy ddp --trainer.gradient_clip_val 1.0. Every lightning.Trainer argument is a
trainer.* key; trainer.max_epochs caps the whole run (both stages together). --print_config
shows the resolved config and exits; --resume continues --run_name NAME. Keys (parsed by
jsonargparse, as LightningCLI does; docs/configuration.md holds this list):
"""


def train_entry() -> None:
    """``crack-train``: ``train.py`` as an installed command."""
    sys.exit(guarded(lambda: train_main(sys.argv[1:])))


def train_main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from crack_lightning.config.parser import config_help

        print(TRAIN_USAGE + "\n" + config_help(), end="")
        return 0
    import argparse

    ap = argparse.ArgumentParser(prog="train.py", add_help=False, allow_abbrev=False)
    ap.add_argument("--config", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--print_config", action="store_true")
    known, rest = ap.parse_known_args(argv)  # the rest: --section.key VALUE overrides
    config_path, resume, print_only = known.config, known.resume, known.print_config
    cfg = load_config(config_path, parse_overrides(rest))
    if print_only:
        print(dump_yaml(cfg), end="")
        return 0
    if resume and not cfg.run_name:
        raise ConfigError("--resume needs the run to continue: pass --run_name NAME (the folder under output_dir)")
    import signal

    from crack_lightning.training.recipe import train

    def _terminate(signum, frame):  # SIGTERM (e.g. a scheduler's kill) ends the run like Ctrl+C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    result = train(cfg, resume=resume)
    test = result["after"].get("test")
    from crack_lightning.training.run_folder import is_global_zero

    if test and is_global_zero():  # under DDP every process returns here: one line for the user
        if result.get("task") == "segment":
            print(f"test pixel F1 {test['f1']:.4f} (2 px tolerance; precision {test['precision']:.4f}, recall "
                  f"{test['recall']:.4f}; before training: {result['before']['test']['f1']:.4f})  -> {result['run_dir']}")
        else:
            print(f"test accuracy {test['acc']:.4f}  F1 {test['f1']:.4f}  (before training: "
                  f"{result['before']['test']['acc']:.4f})  -> {result['run_dir']}")
    return 0
