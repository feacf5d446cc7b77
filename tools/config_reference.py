#!/usr/bin/env python
"""Write docs/configuration.md from the CLI's own parsers (what ``train.py --help`` prints).

    python tools/config_reference.py            # rewrite docs/configuration.md
    python tools/config_reference.py --check    # exit 1 if it is out of date (tests run this)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "configuration.md"


def render() -> str:
    from crack_lightning.cli import TRAIN_USAGE
    from crack_lightning.config import config_help

    return ("# Configuration reference\n\n"
            "Generated from the command line's own parsers by `python tools/config_reference.py`; "
            "`python train.py --help` prints the same. What the recipe's keys do: "
            "[training.md](training.md).\n\n```text\n" + TRAIN_USAGE + "\n" + config_help() + "```\n")


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
