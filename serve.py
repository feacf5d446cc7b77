#!/usr/bin/env python
"""Serve the model over HTTP: ``python serve.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 8000]``."""
import sys

from crack_lightning.cli import guarded
from crack_lightning.server import serve_main

if __name__ == "__main__":
    sys.exit(guarded(lambda: serve_main(sys.argv[1:])))
