"""``serve.py``: the server's command line (options, limits, the model to load) over :mod:`crack_lightning.serve`."""
from __future__ import annotations

import sys
from pathlib import Path

from crack_lightning.cli.guard import guarded
from crack_lightning.limits import (
    SERVER_MAX_BATCH,
    SERVER_MAX_PIXELS,
    SERVER_MAX_QUEUE,
    SERVER_MAX_UPLOAD_MB,
)
from crack_lightning.serve.app import create_app
from crack_lightning.serve.batcher import API_KEY_HEADER


def serve_parser():
    import argparse

    p = argparse.ArgumentParser(prog="serve.py", description="Serve the crack classifier: web page at /, API under "
                                "/v1 (OpenAPI docs at /docs).")
    p.add_argument("--checkpoint", default=None,
                   help="model: .pt release, .ckpt or exported .onnx (default: the model predict.py uses)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require this key in the {API_KEY_HEADER} header of every API request "
                        "(default: the CRACK_LIGHTNING_API_KEY environment variable, else none)")
    p.add_argument("--max-upload-mb", type=float, default=SERVER_MAX_UPLOAD_MB,
                   help="largest request body (413 over it)")
    p.add_argument("--max-pixels", type=int, default=SERVER_MAX_PIXELS, help="largest image accepted, in pixels")
    p.add_argument("--max-queue", type=int, default=SERVER_MAX_QUEUE, help="images waiting for the model before 503")
    p.add_argument("--max-batch", type=int, default=SERVER_MAX_BATCH, help="images per model call")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def serve_main(argv: list[str]) -> int:
    """``serve.py``: load the model once, then serve until Ctrl+C."""
    import os

    from crack_lightning.errors import ConfigError

    args = serve_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1-65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_pixels <= 0 or args.max_queue <= 0 or args.max_batch <= 0:
        raise ConfigError("--max-upload-mb, --max-pixels, --max-queue and --max-batch must be > 0")
    import uvicorn

    from crack_lightning.inference.predictor import Predictor

    predictor = Predictor(args.checkpoint, args.device, batch_size=args.max_batch)
    app = create_app(predictor, api_key=args.api_key or os.environ.get("CRACK_LIGHTNING_API_KEY") or None,
                     max_upload_mb=args.max_upload_mb, max_queue=args.max_queue, max_batch=args.max_batch,
                     max_pixels=args.max_pixels)
    print(f"model {Path(str(predictor.checkpoint)).name} (threshold {float(predictor.threshold):.3f}); "
          f"open http://{args.host}:{args.port}/ (API docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def serve_entry() -> None:
    """``crack-serve``: ``serve.py`` as an installed command."""

    sys.exit(guarded(lambda: serve_main(sys.argv[1:])))
