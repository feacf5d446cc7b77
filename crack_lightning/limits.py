"""Every numeric limit the project enforces, in one table (torch-free).

A config key, a checkpoint's stored hyperparameters, an exported model's contract, the
prediction options and the server all check against these numbers, so a model that
trains is a model that loads, and a limit a user reads in an error message is the one
applied everywhere.
"""
from __future__ import annotations

# images
MAX_PIXELS = 200_000_000  # decoding a file: ~14k x 14k, far above any camera photo, below what exhausts memory
MIN_SIDE = 16  # the smallest image side a file may have
# configuration files and values
CONFIG_MAX_BYTES = 1_000_000  # a config file (the largest shipped one is ~2 kB)
CONFIG_MAX_DEPTH = 32  # nesting of mappings and lists
CONFIG_MAX_ALIASES = 64  # YAML aliases (*name): an alias bomb expands exponentially
# the model
IMAGE_SIZE = (16, 4096)  # a backbone's square input side (0 = the backbone's own)
HEAD_HIDDEN = (0, 65536)  # the head's hidden width (0 = a linear head)
MIN_TILE = 32  # --localize's smallest tile side
# the server
SERVER_MAX_UPLOAD_MB = 50.0  # one request's body
SERVER_MAX_PIXELS = 60_000_000  # one image of a request: a 12 MP photo is 12,000,000
SERVER_MAX_QUEUE = 512  # images waiting for the model across all requests
SERVER_MAX_BATCH = 32  # images the model runs at once
SERVER_MAX_TILES = 20_000  # tiles of one /v1/localize, /v1/predict photo or mark request (a 12 MP photo at 227 px, 50 % overlap: ~1,000)
SITE_MAX_FEATURES = 50_000  # marked tiles one site profile keeps (1,280 fp16 numbers each: 128 MB on disk)
SERVER_SHUTDOWN_S = 3  # seconds a stopping server (SIGTERM, Ctrl+C) gives open requests before calling them off


def in_range(value: object, bounds: tuple[int, int]) -> bool:
    """``value`` is an integer (not a bool) within ``bounds`` (inclusive)."""
    return isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]
