"""The chat page: `GET /` and its script and style under `/web/`, shipped inside the package
(static files, no build step, nothing from a CDN: the box may be offline). Left out of the
OpenAPI schema (it is not part of the API) and turned off with `astrai serve --no-web`."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)
NO_CACHE = {"Cache-Control": "no-cache"}  # a new version of the package shows at once


@router.get("/")
async def chat_page() -> HTMLResponse:
    page = files("astrai_serve").joinpath("web", "index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers=NO_CACHE)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/web", StaticFiles(packages=[("astrai_serve", "web")]), name="web")
