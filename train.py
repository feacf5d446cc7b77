#!/usr/bin/env python
"""Train, evaluate and save a crack classifier: ``python train.py --config configs/base.yaml``."""
from crack_lightning.cli.train import train_entry

if __name__ == "__main__":
    train_entry()
