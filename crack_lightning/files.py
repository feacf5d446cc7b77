"""Crash-safe file writing: a crash never leaves a half-written file that looks valid."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from crack_lightning.errors import OutputError


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
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=float)
        f.write("\n")


RESULTS = Path("results")  # every benchmark's and experiment's numbers: results/<script>/...
RESULTS_HELP = "results file (default: results/<script>/<date-time>_<host>.json, never over an earlier one)"


def results_path(out: str | None, script: str) -> Path:
    """``--out`` if given, else a new dated file under ``results/<script>/`` for this host."""
    if out:
        return Path(out)
    import datetime as dt
    import socket

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return RESULTS / script / f"{stamp}_{host}.json"


def write_results(path: str | Path, results: Any, markdown: str) -> None:
    """A benchmark's numbers as ``path`` (JSON) and the readable table beside it (``.md``); echo the table."""
    write_json(path, results)
    write_text(Path(path).with_suffix(".md"), markdown)
    print(markdown)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


# ---- text in CSV files --------------------------------------------------------------------
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_text(value: str) -> str:
    """A text cell that a spreadsheet shows as text, never runs as a formula: a leading
    ``= + - @ TAB CR`` (or a quote, so that the rule can be undone) gets a ``'`` in front.
    :func:`csv_value` undoes it."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_value(cell: str) -> str:
    """The text :func:`csv_text` was given."""
    return cell[1:] if len(cell) > 1 and cell[0] == "'" and cell[1] in _FORMULA_START else cell


def path_text(path: str | os.PathLike) -> str:
    """A path as text that can always be written (UTF-8 output, JSON, plots, the terminal).

    A file name that is not valid UTF-8 (bytes Python carries as surrogate escapes) is
    written with each such byte as ``\\xNN``; :func:`text_path` reads it back.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def text_path(text: str) -> str:
    """The path :func:`path_text` wrote: ``\\xNN`` escapes become the original bytes again
    (unless a file with the literal name exists)."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    import re

    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return os.fsdecode(raw)


def csv_path(path: str | os.PathLike) -> str:
    """A path as a CSV cell: writable text, never a formula."""
    return csv_text(path_text(path))


def path_from_csv(cell: str) -> str:
    return text_path(csv_value(cell))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_file(path: str | Path, protected: Iterable[str | Path] = (), what: str = "--output",
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """Check, before any work, that ``path`` can be written as a file: its folder exists or can
    be made and is writable, it is not a folder, not one of ``protected`` (the inputs, the
    checkpoint), and, if it exists, it is a file this project wrote (``ours(path)``)."""
    path = Path(path)
    for p in protected:
        if _same_file(path, Path(p)):
            raise OutputError(f"{what} {path_text(path)} is one of the inputs: refusing to write over it")
    if path.is_dir():
        raise OutputError(f"{what} {path_text(path)} is a folder; give a file path")
    if path.exists() and ours is not None and not ours(path):
        raise OutputError(f"{what} {path_text(path)} exists and was not written by crack_lightning: refusing to "
                          "replace it (remove it or choose another name)")
    check_output_dir(path.parent, what)
    return path


def check_output_dir(path: str | Path, what: str = "--output") -> Path:
    """Make ``path`` (a folder) if needed and prove it writable with a probe file."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{what}: {path_text(parent)} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{what}: cannot write to {path_text(path)}: {exc.strerror or exc}") from exc
    return path


PNG_METADATA = {"Software": "crack_lightning"}  # every picture we write says so: see written_by_us


def written_by_us(csv_headers: Sequence[Sequence[str]] = ()) -> Callable[[Path], bool]:
    """``ours`` for :func:`check_output_file`, by kind: a PNG by its ``Software`` text chunk, a CSV by
    its first row being one of ``csv_headers``, a JSON by being an object."""
    def check(path: Path) -> bool:
        suffix = path.suffix.lower()
        if suffix == ".png":
            try:
                from PIL import Image

                with Image.open(path) as im:
                    return im.info.get("Software") == PNG_METADATA["Software"]
            except Exception:  # noqa: BLE001 - not a readable PNG: not ours
                return False
        if suffix == ".json":
            return json_with_keys()(path)
        if suffix == ".csv":
            return any(csv_starts_with(h)(path) for h in csv_headers)
        return False
    return check


def csv_starts_with(header: Sequence[str]) -> Callable[[Path], bool]:
    """``ours`` for :func:`check_output_file`: the file is a CSV whose first row is ``header`` (and, for the
    files that gain columns with an option such as ``--mm-per-pixel``, those after it)."""
    def check(path: Path) -> bool:
        try:
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                first = next(csv.reader(f), None)
                return first is not None and first[:len(header)] == list(header)
        except OSError:
            return False
    return check


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """``ours`` for :func:`check_output_file`: a JSON object holding all of ``keys``."""
    def check(path: Path) -> bool:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return check

def sha256_file(path: Path) -> str:
    """A file's SHA-256, read in 1 MB chunks (byte-identical files share a split by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
