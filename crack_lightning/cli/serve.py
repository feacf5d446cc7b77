"""``serve.py``: the server's command line (options, limits, the model to load) over :mod:`crack_lightning.serve`."""
from __future__ import annotations

import sys
from pathlib import Path

from crack_lightning.cli.guard import guarded, number
from crack_lightning.limits import (
    SERVER_MAX_BATCH,
    SERVER_MAX_PIXELS,
    SERVER_MAX_QUEUE,
    SERVER_MAX_UPLOAD_MB,
    SERVER_SHUTDOWN_S,
)
from crack_lightning.serve.batcher import API_KEY_HEADER


def serve_parser():
    import argparse

    p = argparse.ArgumentParser(prog="serve.py", description="Serve the crack classifier: web page at /, API under "
                                "/v1 (OpenAPI docs at /docs).")
    p.add_argument("--model", "--checkpoint", dest="checkpoint", default=None, metavar="NAME|FILE",
                   help="as predict.py's --model: site (default), field, mendeley, or a .pt/.ckpt/.onnx file")
    p.add_argument("--sites", default="sites", metavar="DIR",
                   help="where the inspectors' site profiles (marks, refitted models, logs) are kept")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=number(int, 1, 65535), default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require this key in the {API_KEY_HEADER} header of every API request "
                        "(default: the CRACK_LIGHTNING_API_KEY environment variable, else none)")
    p.add_argument("--max-upload-mb", type=number(float, 0, low_open=True), default=SERVER_MAX_UPLOAD_MB,
                   help="largest request body (413 over it)")
    p.add_argument("--max-pixels", type=number(int, 1), default=SERVER_MAX_PIXELS,
                   help="largest image accepted, in pixels")
    p.add_argument("--max-queue", type=number(int, 1), default=SERVER_MAX_QUEUE,
                   help="images waiting for the model before 503 (also the most images one request may send)")
    p.add_argument("--max-batch", type=number(int, 1), default=SERVER_MAX_BATCH, help="images per model call")
    p.add_argument("--segment-checkpoint", default=None,
                   help="segmentation model for POST /v1/segment (default: models/crack_seg_lite0.pt when there; "
                        "'none': no segmentation)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def serve_main(argv: list[str]) -> int:
    """``serve.py``: load the model once, then serve until Ctrl+C."""
    import os

    from crack_lightning.errors import ConfigError

    args = serve_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("CRACK_LIGHTNING_API_KEY") or None
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise ConfigError(f"the API key must be printable ASCII (what an HTTP header carries), got {api_key!r}")
    sock = listening_socket(args.host, args.port)  # a port in use is said before the model loads
    import uvicorn

    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.serve.app import create_app

    predictor = Predictor(args.checkpoint, args.device, batch_size=args.max_batch)
    app = create_app(predictor, segmenter=_segmenter(args.segment_checkpoint, args.device), sites=args.sites, api_key=api_key, max_upload_mb=args.max_upload_mb, max_queue=args.max_queue,
                     max_batch=args.max_batch, max_pixels=args.max_pixels)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=SERVER_SHUTDOWN_S))
    print(f"model {predictor.name} (threshold {float(predictor.threshold):.3f}); "
          f"open http://{args.host}:{args.port}/ (API docs: /docs)", flush=True)
    server.run(sockets=[sock])
    return 0


def _segmenter(choice: str | None, device: str):
    """The segmentation model to serve: the one named, else the shipped one if installed, else none."""
    from crack_lightning.inference.outputs import DEFAULT_CHECKPOINT, SEGMENT_MODEL

    if choice == "none":
        return None
    from crack_lightning.inference.segment import (
        load_segmenter,  # segmentation-models-pytorch: 2 s to import
    )

    path = Path(choice) if choice else DEFAULT_CHECKPOINT.with_name(SEGMENT_MODEL)
    if choice is None and not path.is_file():
        return None
    return load_segmenter(path, device, engine="auto")


def listening_socket(host: str, port: int):
    """The server's socket, bound now: a port in use or an address not on this machine is one line."""
    import socket

    from crack_lightning.errors import ConfigError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running "
                          "there? choose another --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_entry() -> None:
    """``crack-serve``: ``serve.py`` as an installed command."""

    sys.exit(guarded(lambda: serve_main(sys.argv[1:])))
