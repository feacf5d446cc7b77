"""The preprocessing contract's arithmetic on tensors: normalisation and OpenCV-exact area resizing
on any device, so a GPU can finish uint8 batches exactly as the CPU pipeline would."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from crack_lightning.contract import Preprocessing


def normalize(pre: Preprocessing, x: torch.Tensor) -> torch.Tensor:
    """``(x/255 - mean) / std`` of a uint8 ``(B,3,H,W)`` batch, on whatever device it is.

    Loaders built with ``normalize=False`` ship uint8 (4x less to copy and pin)
    and the model applies this on the GPU: the same arithmetic as
    :func:`eval_transform`'s last step, tested equal. ``x`` may be a
    channels_last view (what :meth:`model_input` makes); the result keeps it.
    """
    mean, std = _on_device((pre.mean, pre.std), x.device)
    return (x.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def model_input(pre: Preprocessing, x: torch.Tensor) -> torch.Tensor:
    """What a backbone takes, on ``x``'s device: normalised floats ``(B,3,S,S)`` pass as they are;
    uint8 batches are ``(B,H,W,3)`` (what :func:`stack_uint8` ships), area-resized here when
    not yet ``S x S`` (:func:`area_resize`), then normalised into a channels_last ``(B,3,S,S)``."""
    if x.dtype != torch.uint8:
        return x
    if tuple(x.shape[1:3]) != (pre.size, pre.size):
        x = area_resize(x, pre.size)
    return normalize(pre, x.permute(0, 3, 1, 2))


@lru_cache(maxsize=64)
def _on_device(values: tuple, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Small float32 constants, copied to ``device`` once: a fresh host-to-GPU copy per batch
    would make the host wait for the GPU and stall the prediction pipeline."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in values)


@lru_cache(maxsize=64)
def _area_taps(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``computeResizeAreaTab`` for one axis: ``(K, dst)`` source indices and float32
    weights, tap ``j`` of every output in row ``j``, in OpenCV's order (unused taps: weight 0
    on index 0). Built once per device, like :func:`_on_device`."""
    scale = src / dst
    taps: list[list[tuple[int, float]]] = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s2 = min(math.floor(f2), src - 1)
        s1 = min(math.ceil(f1), s2)
        t = [(s1 - 1, (s1 - f1) / cell)] if s1 - f1 > 1e-3 else []
        t += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            t.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        taps.append(t)
    k = max(len(t) for t in taps)
    index = torch.zeros(k, dst, dtype=torch.long)
    weight = torch.zeros(k, dst, dtype=torch.float32)  # OpenCV rounds the double weights to float
    for d, t in enumerate(taps):
        for j, (s, w) in enumerate(t):
            index[j, d], weight[j, d] = s, w
    return index.to(device), weight.to(device)


def area_resize_exact(height: int, width: int, size: int) -> bool:
    """Whether :func:`area_resize` reproduces ``cv2.resize(INTER_AREA)`` for this size: a
    downscale (or none) whose factors are not integers on both axes (OpenCV takes a
    separate integer path there)."""
    if (height, width) == (size, size):
        return True
    return height >= size and width >= size and not (height % size == 0 and width % size == 0)


def _area_axis(x: torch.Tensor, dim: int, dst: int) -> torch.Tensor:
    index, weight = _area_taps(x.shape[dim], dst, x.device)
    shape = [1] * x.ndim
    shape[dim] = dst
    out = None
    for j in range(len(index)):  # one tap at a time, product then sum: OpenCV's float order, no FMA
        term = x.index_select(dim, index[j]) * weight[j].view(shape)
        out = term if out is None else out + term
    return out


def area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B,H,W,C)`` uint8 -> ``(B,S,S,C)`` uint8, identical to :func:`resize_op` (OpenCV
    INTER_AREA) for the sizes :func:`area_resize_exact` accepts, on any device."""
    if not area_resize_exact(x.shape[1], x.shape[2], size):
        raise ValueError(f"area_resize cannot reproduce OpenCV for {tuple(x.shape[1:3])} -> {size}")
    if tuple(x.shape[1:3]) == (size, size):
        return x
    y = _area_axis(_area_axis(x.float(), 2, size), 1, size)  # horizontal, then vertical, as OpenCV
    return torch.round(y).clamp_(0, 255).to(torch.uint8)  # round half to even, as cvRound
