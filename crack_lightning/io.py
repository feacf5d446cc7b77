"""Crash-safe file writing: a crash never leaves a half-written file that looks valid."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Write to a temp file in the same folder, then rename over ``path``.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=float)
        f.write("\n")


def write_results(path: str | Path, results: Any, markdown: str) -> None:
    """A benchmark's numbers as ``path`` (JSON) and the readable table beside it (``.md``); echo the table."""
    write_json(path, results)
    write_text(Path(path).with_suffix(".md"), markdown)
    print(markdown)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
