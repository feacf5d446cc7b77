"""HTTP API and web page for people and programs that do not run Python (``serve.py``).

One model, loaded once (:class:`~crack_lightning.inference.predictor.Predictor`, the same as
``predict.py``). Images from concurrent requests are decoded in a thread pool, then run through the
model together by one :class:`~crack_lightning.serve.batcher.Batcher`. Uploads are read into memory;
client file names are only echoed back, never used as paths."""
from __future__ import annotations

import asyncio
import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from crack_lightning.data.images import decode_image, image_size
from crack_lightning.data.tiles import is_patch, photo_tile_count
from crack_lightning.errors import BadImageError, Stopped
from crack_lightning.inference.localize import heat_layer_png, localize_array
from crack_lightning.limits import (
    MIN_TILE,
    SERVER_MAX_BATCH,
    SERVER_MAX_PIXELS,
    SERVER_MAX_QUEUE,
    SERVER_MAX_TILES,
    SERVER_MAX_UPLOAD_MB,
)
from crack_lightning.serve.batcher import Batcher, QueueFull
from crack_lightning.serve.middleware import ApiKey, BodyLimit, _error


def create_app(predictor, *, segmenter=None, sites=None, api_key: str | None = None, max_upload_mb: float = SERVER_MAX_UPLOAD_MB,
               max_queue: int = SERVER_MAX_QUEUE, max_batch: int = SERVER_MAX_BATCH, max_pixels: int = SERVER_MAX_PIXELS,
               decode_threads: int = 4, max_localize: int = 2):
    """The FastAPI application around a loaded :class:`~crack_lightning.inference.predictor.Predictor`."""
    batcher = Batcher(predictor, max_batch=max_batch, max_queue=max_queue)
    decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
    prepare = predictor.preparer(max_pixels)
    localize_slots = asyncio.Semaphore(max_localize)
    model_name = predictor.name
    threshold = float(predictor.threshold)
    names = list(predictor.class_names)

    stopping = threading.Event()  # set when the server stops: running work ends at its next batch

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        stopping.set()
        await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    # FastAPIOffline: /docs and /redoc from files the fastapi-offline package ships (FastAPI's own pages
    # load them from a CDN: a blank page on a machine without internet)
    app = FastAPIOffline(title="crack_lightning", version=_version(), lifespan=lifespan,
                  description="Is there a crack in this photo of concrete? Patches (`/v1/predict`) and "
                              "full-size photos (`/v1/localize`).")
    app.state.batcher = batcher

    profiles = None
    if sites is not None:
        from crack_lightning.inference.sites import SiteProfiles

        profiles = SiteProfiles(sites, predictor.photos, predictor)

    def photo_predictor(site: str | None):
        """The predictor that answers photos for ``site`` (its profile's model, the server's own before any
        mark), or the server's own."""
        if not site:
            return predictor
        if profiles is None:
            raise HTTPException(404, "this server keeps no site profiles (serve.py --sites DIR)")
        from crack_lightning.errors import InputError

        try:
            return profiles.predictor(site) or predictor
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404, 405): one body shape
    async def http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _error(400, "malformed request: " + "; ".join(e.get("msg", "") for e in exc.errors())[:500])


    async def read_files(request: Request, field: str) -> list[tuple[str, bytes]]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(400, f"send the images as multipart/form-data, field '{field}'")
        try:
            form = await request.form(max_files=10_000)
        except Exception as exc:  # noqa: BLE001 - whatever the multipart parser says, it is the client's request
            if request.scope.get(BodyLimit.FLAG):
                raise BodyLimit._TooLarge from exc
            raise HTTPException(400, f"malformed multipart body: {exc}") from exc
        if request.scope.get(BodyLimit.FLAG):
            await form.close()
            raise BodyLimit._TooLarge
        try:
            uploads = [u for u in form.getlist(field) if isinstance(u, UploadFile)]
            if not uploads:
                raise HTTPException(400, f"no file in the multipart field '{field}'")
            return [(u.filename or f"file{i + 1}", await u.read()) for i, u in enumerate(uploads)]
        finally:
            await form.close()  # spooled parts are freed now, not whenever the GC runs

    async def decode(data: bytes, fn):
        return await asyncio.get_running_loop().run_in_executor(decoders, fn, data)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "threshold": threshold, "class_names": names,
                "queue": batcher.waiting, "batches": batcher.batches, "images": batcher.images,
                "segment": segmenter is not None, "sites": profiles is not None}

    @app.post("/v1/predict", summary="Crack answer for each uploaded image (multipart field `files`)")
    async def predict(request: Request, site: str | None = None):
        photos_by = photo_predictor(site)
        files = await read_files(request, "files")
        if len(files) > batcher.max_queue:  # could never fit the queue: not "busy", too large
            return _error(413, f"{len(files)} images in one request; at most {batcher.max_queue} (send them in parts)")
        prepared = await asyncio.gather(*(decode(data, _try(sort_input)) for _, data in files))
        good = [i for i, (item, err) in enumerate(prepared) if err is None and item[0] == "patch"]
        try:
            probs = await batcher.submit([prepared[i][0][1] for i in good])
        except QueueFull as exc:
            return _error(503, f"server busy: {exc}; retry shortly", {"Retry-After": "1"})
        by_index = {i: (float(p), names[int(float(p) >= threshold)]) for i, p in zip(good, probs)}
        for i, ((name, data), (item, err)) in enumerate(zip(files, prepared)):
            if err is None and item[0] == "photo":  # a photo: its tiles, as the viewer shows them
                _, answer = await on_one_photo(request, lambda image, n, stop: photos_by.answer(image, n, should_stop=stop),
                                               bounded_photo(photos_by), upload=(name, data))
                if isinstance(answer, JSONResponse):
                    if answer.status_code == 503:
                        return answer
                    prepared[i] = (None, json.loads(answer.body)["error"])
                else:
                    by_index[i] = (answer.probability, answer.label)
        results = []
        for i, (name, _) in enumerate(files):
            if i in by_index:
                p, label = by_index[i]
                results.append({"filename": name, "probability": round(p, 6), "label": label})
            else:
                results.append({"filename": name, "error": prepared[i][1]})
        return {"results": results, "threshold": threshold, "photo_threshold": float(photos_by.photos.threshold),
                "model": model_name, "site": site}

    async def run_cancellable(request: Request, work):
        """``work(should_stop)`` on the model thread; a client that leaves, or a stopping server, calls it off."""
        gone = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            batcher.model_thread, lambda: work(lambda: gone.is_set() or stopping.is_set()))
        while not job.done():
            await asyncio.wait([job], timeout=0.25)
            if not job.done() and await request.is_disconnected():
                gone.set()
        return await job

    async def on_one_photo(request: Request, run, check=None, upload: tuple[str, bytes] | None = None):
        """The request's one photo (field ``file``, or ``upload``), decoded within the slots for whole-photo work,
        then ``run(image, name, should_stop)`` on the model thread, called off when the client leaves or the
        server stops. ``check(image)``: an error response that refuses the work before it starts. Returns
        ``(name, result)``, or ``(name, error response)``."""
        if upload is None:
            files = await read_files(request, "file")
            if len(files) != 1:
                raise HTTPException(400, f"send exactly one photo in the field 'file', got {len(files)}")
            upload = files[0]
        name, data = upload
        if localize_slots.locked() and batcher.waiting >= batcher.max_queue:  # both saturated: shed load
            return name, _error(503, "server busy; retry shortly", {"Retry-After": "5"})
        async with localize_slots:
            image, err = await decode(data, _try(lambda b: decode_image(b, max_pixels)))
            if err:
                return name, _error(422, f"{name}: {err}")
            refused = check(image) if check else None
            if refused is not None:
                return name, refused
            try:
                return name, await run_cancellable(request, lambda stop: run(image, name, stop))
            except Stopped:
                return name, _error(503, "the server is stopping" if stopping.is_set() else "the client went away")

    def sort_input(data: bytes):
        """A patch, prepared for the batcher; or a photo, left as its bytes (decoded later, within the slots)."""
        size = image_size(data)
        return ("photo", None) if size and not is_patch(*size) else ("patch", prepare(data))

    def bounded_photo(by, tile: int = 0, stride: int = 0):
        """Refuses a photo whose tiles would be more work than one request may ask for, before it starts."""
        def check(image):
            sides = [tile] if tile else list(by.photo_tiles)
            count = photo_tile_count(image.shape[1], image.shape[0], sides, stride)
            if count > SERVER_MAX_TILES:
                return _error(400, f"tiles of {'/'.join(map(str, sides))} px make {count:,} tiles of this "
                                   f"{image.shape[1]}x{image.shape[0]} photo; at most {SERVER_MAX_TILES:,}: "
                                   "choose a larger stride or tile")
            return None
        return check

    @app.post("/v1/localize", summary="The answer for one photo, and every tile it came from (multipart field `file`)")
    async def localize(request: Request, tile: int = 0, stride: int = 0, site: str | None = None):
        if not (tile == 0 or MIN_TILE <= tile <= 4096) or not 0 <= stride <= 4096:
            raise HTTPException(400, f"tile must be 0 (the photo tiles) or {MIN_TILE}-4096, and stride 0-4096 "
                                     "(0: half the tile)")
        by = photo_predictor(site)

        def run(image, name, stop):
            answer = by.answer(image, name, should_stop=stop)
            loc = answer.localization
            if loc is None or tile or stride:  # a patch (answered whole), or other tiles asked for
                loc = localize_array(image, by.photos, tile, stride or None, name, should_stop=stop)
            return answer, loc

        name, done = await on_one_photo(request, run, bounded_photo(by.photos, tile, stride))
        if isinstance(done, JSONResponse):
            return done
        answer, loc = done
        png = await decode(loc, heat_layer_png)
        return {"filename": name, "width": loc.width, "height": loc.height, "threshold": loc.threshold,
                "label": answer.label, "probability": round(answer.probability, 6), "site": site,
                "tiles": [{"x": t.x, "y": t.y, "width": t.width, "height": t.height,
                           "probability": round(t.probability, 6)} for t in loc.tiles],
                "crack_tiles": len(loc.crack_tiles), "crack_fraction": round(loc.crack_fraction(), 6),
                "heatmap_png": base64.b64encode(png).decode("ascii")}

    @app.post("/v1/segment", summary="Every crack of one photo: mask, length and width (multipart field `file`)")
    async def segment(request: Request, mm_per_pixel: float | None = None):
        if segmenter is None:
            raise HTTPException(404, "this server has no segmentation model (serve.py --segment-checkpoint)")
        if mm_per_pixel is not None and not 0 < mm_per_pixel < 1e3:
            raise HTTPException(400, f"mm_per_pixel must be a positive scale, got {mm_per_pixel}")
        from crack_lightning.inference.segment import (
            segment_array,  # smp's import (2 s) only where a model is served
        )

        name, seg = await on_one_photo(request, lambda image, name, stop: segment_array(
            image, segmenter, name, should_stop=stop))
        if isinstance(seg, JSONResponse):
            return seg
        png = await decode(seg.mask, mask_png)
        return {"filename": name, "width": seg.width, "height": seg.height,
                "threshold": float(segmenter.threshold), "min_crack_px": seg.min_crack_px, "crack": seg.cracked,
                "cracks": [c.row(mm_per_pixel) for c in seg.cracks], "mask_png": base64.b64encode(png).decode("ascii")}

    if profiles is not None:
        from crack_lightning.serve.review import add_review_routes

        async def on_model_thread(fn):
            return await asyncio.get_running_loop().run_in_executor(batcher.model_thread, fn)

        add_review_routes(app, profiles, read_files, on_model_thread, max_pixels)

    static = resources.files("crack_lightning.serve") / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 1e6))
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    return app


def mask_png(mask) -> bytes:
    """A crack mask as an 8-bit PNG (255 = crack), the photo's size."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _try(fn):
    """``fn`` returning ``(result, None)``, or ``(None, reason)`` for a file that is not a usable image."""
    def run(arg):
        try:
            return fn(arg), None
        except BadImageError as exc:
            return None, str(exc)
    return run


def _version() -> str:
    from crack_lightning import __version__

    return __version__
