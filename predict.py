#!/usr/bin/env python
"""Predict crack / no crack for images: ``python predict.py [--checkpoint CKPT] INPUT... --output preds.csv``."""
from crack_lightning.cli.predict import predict_entry

if __name__ == "__main__":
    predict_entry()
