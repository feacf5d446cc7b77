"""The inspector's review loop over HTTP: marks on a site's photos, the site's refitted model, its log.

    POST   /v1/sites/{site}/marks   one photo (field ``file``); ``label`` = crack | no crack; optional tile
                                    ``x, y, width, height``; ``who``. Stores the mark, refits the site's model.
    GET    /v1/sites                every profile: marks, threshold
    GET    /v1/sites/{site}         one profile, with its log (who/when/what)
    GET    /v1/sites/{site}/model   the site's model file (``predict.py --model FILE`` answers as the server)
    DELETE /v1/sites/{site}         forget the marks and the model (the log keeps the reset)

Requests to ``/v1/predict`` and ``/v1/localize`` with ``?site=NAME`` answer photos with the site's model."""
from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse

from crack_lightning.data.images import decode_image
from crack_lightning.errors import BadImageError, InputError
from crack_lightning.inference.sites import LABELS, SiteProfiles, check_site


def add_review_routes(app, profiles: SiteProfiles, read_files, on_model_thread, max_pixels: int) -> None:
    def site_name(site: str) -> str:
        try:
            return check_site(site)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/v1/sites", summary="The site profiles: marks and thresholds")
    async def sites():
        return {"sites": profiles.names()}

    @app.get("/v1/sites/{site}", summary="One site profile, with its log of marks and refits")
    async def site_profile(site: str):
        if not profiles.folder(site_name(site)).is_dir():
            raise HTTPException(404, f"no site profile {site!r}")
        return {**profiles.summary(site), "log": profiles.log(site)}

    @app.post("/v1/sites/{site}/marks", summary="Mark a photo, or one tile of it, as crack / no crack; refit the site")
    async def mark(request: Request, site: str, label: str, x: int | None = None, y: int | None = None,
                   width: int | None = None, height: int | None = None, who: str = ""):
        site = site_name(site)
        if label not in LABELS:
            raise HTTPException(400, f"label must be one of: {', '.join(LABELS)}")
        box = (x, y, width, height)
        if any(v is not None for v in box) and any(v is None for v in box):
            raise HTTPException(400, "a tile needs all of x, y, width and height (or none: the whole photo)")
        files = await read_files(request, "file")
        if len(files) != 1:
            raise HTTPException(400, f"send exactly one photo in the field 'file', got {len(files)}")
        name, data = files[0]

        def work():
            image = decode_image(data, max_pixels)
            return profiles.mark(site, image, name, data, label, None if box[0] is None else box, who[:200])

        try:
            return await on_model_thread(work)
        except BadImageError as exc:
            raise HTTPException(422, f"{name}: {exc}") from None
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/v1/sites/{site}/model", summary="The site's model file, for predict.py --model")
    async def site_model(site: str):
        model = profiles.folder(site_name(site)) / "model.pt"
        if not model.is_file():
            raise HTTPException(404, f"site {site!r} has no model yet: mark a photo first")
        return FileResponse(model, filename=f"{site}.pt", media_type="application/octet-stream")

    @app.delete("/v1/sites/{site}", summary="Forget a site's marks and model (its log stays)")
    async def reset(site: str, who: str = ""):
        try:
            return profiles.reset(site_name(site), who[:200])
        except KeyError:
            raise HTTPException(404, f"no site profile {site!r}") from None
