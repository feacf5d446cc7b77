#!/usr/bin/env python
"""Serve the model over HTTP: ``python serve.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 8000]``."""
from crack_lightning.cli.serve import serve_entry

if __name__ == "__main__":
    serve_entry()
