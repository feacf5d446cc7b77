"""What this machine has and the rules that follow from it: cores, GPUs, the precision on a GPU."""
from __future__ import annotations

import os
import platform

import torch


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def no_gpu_hint(accelerator: str, flag: str) -> str:
    """`` (this machine has no CUDA GPU: use FLAG cpu)`` when ``accelerator`` asks for a GPU that
    is not here (appended to Lightning's own message), else ``""``."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return f" (this machine has no CUDA GPU: use {flag} cpu)"
    return ""


def gpu_autocast(device: torch.device | str):
    """THE PyTorch precision rule: bf16 autocast on a GPU (tensor cores), float32 elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def machine(device: str | None = None) -> dict:
    """The machine a figure was measured on (the GPU of ``device``, or the first one): what every
    run's ``metrics.json`` and every benchmark's results file record."""
    import socket

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device) if device and "cuda" in str(device) else 0)
    return {"host": socket.gethostname(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "gpu_count": torch.cuda.device_count() if gpu else 0, "torch": torch.__version__,
            "python": platform.python_version()}


def describe(hw: dict) -> str:
    """:func:`machine`'s record as one line for a results table."""
    return (f"{hw['machine']}, {hw['cpu_count']} cores, {hw['torch_threads']} torch threads, "
            f"GPU: {hw['gpu'] or 'none'}, torch {hw['torch']} (host {hw['host']})")


def hardware() -> str:
    """A short name of this machine's compute for ``metrics.json``."""
    hw = machine()
    if hw["gpu"]:
        return f"{hw['gpu_count']}x {hw['gpu']}"
    return f"CPU {hw['processor'] or hw['machine']}, {hw['cpu_count']} cores, {hw['torch_threads']} threads"


def multi_node_problem() -> str | None:
    """Why this process cannot be one node of a multi-node run, or ``None``: Lightning's DDP waits (for
    30 minutes, silently) for nodes that a single machine's plain start will never bring."""
    env = os.environ
    launched = ("MASTER_ADDR" in env and "NODE_RANK" in env) or "SLURM_JOB_ID" in env or \
        "TORCHELASTIC_RUN_ID" in env or "LSB_JOBID" in env
    if launched:
        return None
    return ("this process was not started as one node of a multi-node job (no MASTER_ADDR and NODE_RANK, "
            "SLURM, torchrun or LSF environment): start the same command on every node with MASTER_ADDR, "
            "MASTER_PORT and NODE_RANK set, or leave --num_nodes at 1")
