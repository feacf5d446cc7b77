"""What the tools that rework a finished run folder share (``tools/interpolate.py``, ``tools/anchors.py``):
reading the run's split from another machine's paths, and their common options."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from crack_lightning.cli.guard import guarded
from crack_lightning.data.records import Record, read_split_csv
from crack_lightning.errors import ConfigError


def remap_paths(records: list[Record], pairs: Sequence[str]) -> list[Record]:
    """Rewrite the beginning of each record's path by the first matching ``OLD=NEW`` pair, in place
    (a split made on another machine, e.g. a lent GPU host). Raises ConfigError on a malformed pair."""
    maps = [kv.split("=", 1) for kv in pairs]
    if any(len(m) != 2 or not m[0] for m in maps):
        raise ConfigError("--path-map takes OLD=NEW pairs")
    for r in records:
        for old, new in maps:
            if r.path.startswith(old):
                r.path = new + r.path[len(old):]
                break
    return records


def read_run_split(run_dir: Path, path_map: Sequence[str] = (), need: Sequence[str] = ("train", "val", "test")) -> list[Record]:
    """A finished run's ``split.csv``, paths rewritten by ``path_map`` (:func:`remap_paths`); every image of
    the ``need`` splits must be here, else ConfigError naming one and the ``--path-map`` remedy."""
    if not (Path(run_dir) / "split.csv").is_file() or not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (no split.csv or config.yaml)")
    records = remap_paths(read_split_csv(Path(run_dir) / "split.csv"), path_map)
    missing = sorted({r.path for r in records if r.split in need and not Path(r.path).is_file()})
    if missing:
        raise ConfigError(f"{len(missing)} image(s) of the split are not here (e.g. {missing[0]}): a run made on "
                          "another machine needs --path-map OLD=NEW")
    return records


def run_folder_tool(ap, run: Callable, argv: list[str] | None = None) -> int:
    """The tools that rework a finished run folder (tools/interpolate.py, tools/anchors.py): their shared
    options (``--path-map`` for a run made on another machine, ``--num-workers``), errors as :func:`guarded`."""
    ap.add_argument("--path-map", nargs="*", default=[], metavar="OLD=NEW",
                    help="rewrite the beginning of the split's paths (a run made on another machine)")
    ap.add_argument("--num-workers", type=int, default=2)
    args = ap.parse_args(argv)
    return guarded(lambda: run(args))
