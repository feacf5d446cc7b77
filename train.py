#!/usr/bin/env python
"""Train, evaluate and save a crack classifier: ``python train.py --config configs/base.yaml``."""
import sys

from crack_lightning.cli import guarded, train_main

if __name__ == "__main__":
    sys.exit(guarded(lambda: train_main(sys.argv[1:])))
