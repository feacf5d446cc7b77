#!/usr/bin/env python
"""Write docs/configuration.md from the CLI's own parsers (what ``train.py --help`` prints), and the
stored ``lightning.Trainer`` help that lets ``--help`` answer without importing Lightning.

    python tools/config_reference.py            # rewrite both
    python tools/config_reference.py --check    # exit 1 if either is out of date (tests run this)
"""
from __future__ import annotations

import sys
from pathlib import Path

from crack_lightning.cli.train import TRAIN_USAGE
from crack_lightning.config.parser import (
    TRAINER_HELP,
    _help_versions,
    config_help,
    trainer_help,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> dict[Path, str]:
    """Both files, made afresh from the parsers (never from the stored text)."""
    doc = ("# Configuration reference\n\n"
           "Generated from the command line's own parsers by `python tools/config_reference.py`; "
           "`python train.py --help` prints the same. What the recipe's keys do: "
           "[training.md](training.md).\n\n```text\n" + TRAIN_USAGE + "\n" + config_help(cached=False) + "```\n")
    return {DOC: doc, TRAINER_HELP: _help_versions() + "\n" + trainer_help(cached=False)}


def main() -> int:
    files = render()
    if "--check" in sys.argv[1:]:
        stale = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"{p} is out of date: run python tools/config_reference.py", file=sys.stderr)
        return 1 if stale else 0
    for p, text in files.items():
        p.write_text(text, encoding="utf-8")
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
