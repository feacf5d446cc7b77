#!/usr/bin/env python
"""Predict crack / no crack for images: ``python predict.py [--checkpoint CKPT] INPUT... --output preds.csv``."""
import sys

from crack_lightning.cli import guarded, predict_main

if __name__ == "__main__":
    sys.exit(guarded(lambda: predict_main(sys.argv[1:])))
