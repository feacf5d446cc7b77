"""One clear line per user mistake: what every entry point runs its ``main`` under (exit 2, no traceback)."""
from __future__ import annotations

import errno
import sys
from typing import Callable

from crack_lightning.errors import UserError
from crack_lightning.files import path_text

# only light modules above: a mistake in the command line or a config file is reported without torch
USER_ERRORS = (UserError, PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


# a disk that fills up, a quota, a read-only or vanished file system: the user's to fix, not a bug
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}


def guarded(main: Callable[[], int]) -> int:
    """Run ``main``; turn known user errors into ``error: <message>`` and exit code 2."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 must never crash a print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return main()
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (*USER_ERRORS, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, USER_ERRORS) and exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        msg = str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            msg = f"{exc.strerror}: {path_text(exc.filename)}" if exc.filename else exc.strerror
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                msg += " (nothing half-written was left in place of an output; free space and run again)"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a run that finished an epoch keeps its checkpoints (continue with the same command "
              "plus --resume --run_name NAME); one that had not is removed", file=sys.stderr)
        return 130


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse ``type`` for a finite number within ``[low, high]`` (``low_open``: above ``low``): NaN,
    infinities and out-of-range values are a usage error naming the option, never a traceback later."""
    import argparse
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            where = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse
