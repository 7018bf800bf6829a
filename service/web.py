"""The web console at ``/`` and the API's own Swagger UI at ``/docs``: static files of ``service/console``
(plain HTML, one ES module, one CSS file; Swagger UI's assets vendored, so nothing comes from a CDN).

Every page and asset is sent with a strict Content-Security-Policy (scripts, styles, images and
connections from this origin only; images also from ``blob:``, which is how the console shows the
PNGs it fetched with the bearer header), no framing, no referrer, and ``nosniff``. The console keeps
the API key in ``sessionStorage`` and sends it as the bearer header: no cookie, so no CSRF.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI sets style attributes from its markup: its page alone may use inline styles.
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """Adds the CSP and the other headers to the console's and the docs' responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/" or path == "/docs" or path.startswith("/console/")):
            await self.app(scope, receive, send)
            return
        policy = DOCS_CSP if path == "/docs" or path.startswith("/console/vendor/") else CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"content-security-policy", policy.encode()))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI) -> None:
    """Serve the console at ``/``, its files under ``/console/``, and Swagger UI at ``/docs``."""

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "docs.html", headers={"Cache-Control": "no-cache"})

    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")
    app.add_middleware(SecurityHeaders)
