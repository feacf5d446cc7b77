"""What every benchmark script shares: one description of the machine, and where results go.

Results land in ``bench/results/<date-time>_<host>_<name>.json`` (and ``.md``) unless ``--out``
names a file: a new measurement never overwrites an earlier one, and every file says what
machine produced it.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def hardware(device: str | None = None) -> dict:
    """The machine a figure was measured on (the GPU of ``device``, or the first one)."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device) if device and "cuda" in str(device) else 0)
    return {"host": socket.gethostname(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def describe(hw: dict) -> str:
    """One line for a results table."""
    return (f"{hw['machine']}, {hw['cpu_count']} cores, {hw['torch_threads']} torch threads, "
            f"GPU: {hw['gpu'] or 'none'}, torch {hw['torch']} (host {hw['host']})")


def out_path(out: str | None, name: str) -> Path:
    """``--out`` if given, else a new dated file under bench/results/ for this host."""
    if out:
        return Path(out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return ROOT / "bench" / "results" / f"{stamp}_{host}_{name}.json"


OUT_HELP = "results file (default: bench/results/<date-time>_<host>_<name>.json, never over an earlier one)"
