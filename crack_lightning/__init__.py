"""crack_lightning: is there a crack in this photo of concrete? Train, evaluate, predict, localise, serve.

The public API is imported lazily, so ``import crack_lightning`` (and a command-line
mistake) does not pay for importing torch and Lightning::

    from crack_lightning import CrackClassifier, Predictor
    model = CrackClassifier.load_from_checkpoint("runs/NAME/checkpoints/frozen/best.ckpt")
"""
from __future__ import annotations

__version__ = "0.3.0"

_API = {
    "CrackClassifier": "model", "CrackDataModule": "data", "Predictor": "predict", "load_model": "checkpoint",
    "save_release": "checkpoint", "localize": "localize", "decode_image": "images", "create_app": "server",
    "load_config": "config", "train": "training",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'crack_lightning' has no attribute {name!r}")
