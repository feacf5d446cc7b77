"""The preprocessing contract: what every model of the project expects of its input (torch-free).

Training, prediction, export (the contract JSON beside an ONNX file) and the server all build
their pipelines from one :class:`Preprocessing`, stored inside every checkpoint, so what a model
saw in training is what it sees afterwards. Its arithmetic on tensors is
:mod:`crack_lightning.tensor_ops`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing contract: square resize to ``size`` then ``(x/255 - mean) / std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_model(cls, model: Any, size: int = 0) -> "Preprocessing":
        """Read mean/std/size from timm's data config of ``model`` (``size`` > 0 overrides)."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return cls(
            size=int(size or cfg["input_size"][-1]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
        )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))
