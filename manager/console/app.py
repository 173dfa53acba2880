"""The console's starlette application: six pages and the JSON API behind them.

Pages are jinja2 shells; ``static/console.js`` fills them from ``/api/...`` and polls
again every 1.5 s, so they stay live without a reload. No inline script or style
anywhere: the Content-Security-Policy is ``default-src 'self'``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from manager.console.auth import ConsoleGuard
from manager.console.backend import ActionError, BusBackend

HERE = Path(__file__).resolve().parent
PAGES = (  # path, template, title
    ("/", "cluster.html", "Cluster"),
    ("/vips", "vips.html", "VIPs"),
    ("/config", "config.html", "Configuration"),
    ("/logs", "logs.html", "Logs"),
    ("/cidr", "cidr.html", "CIDR paths"),
    ("/commands", "commands.html", "Commands"),
)
MAX_BODY = 64 * 1024


class BadRequest(ActionError):
    def __init__(self, message: str):
        super().__init__(message, "bad_request", 400)


async def json_body(request: Request) -> dict:
    """A POST's JSON object, or BadRequest (also when it is not application/json)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest("send the body as application/json")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest("body too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def create_app(backend: BusBackend, token: str, cookie: str) -> Starlette:
    """The console application, guarded by ``token`` (see :mod:`manager.console.auth`)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    def page(template: str, title: str):
        async def render(request: Request) -> Response:
            return templates.TemplateResponse(request, template, {
                "title": title, "pages": PAGES, "path": request.url.path,
                "cluster": backend.cluster.name, "manager": backend.member})
        return render

    async def api_cluster(request: Request) -> Response:
        return JSONResponse(await backend.cluster_page())

    async def api_vips(request: Request) -> Response:
        return JSONResponse(await backend.vips_page())

    async def api_vips_move(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await backend.move_vip(body.get("vip"), body.get("node")))

    async def api_vips_unpin(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await backend.unpin_vip(body.get("vip")))

    async def api_nodes_drain(request: Request) -> Response:
        body = await json_body(request)
        drain = body.get("drain", True)
        if not isinstance(drain, bool):
            raise BadRequest("drain must be true or false")
        return JSONResponse(await backend.drain_node(body.get("node"), drain))

    async def api_config(request: Request) -> Response:
        return JSONResponse(await backend.config_page(request.query_params.get("diff") or None))

    async def api_logs(request: Request) -> Response:
        q = request.query_params
        try:
            lines = int(q.get("lines", "50"))
        except ValueError:
            raise BadRequest("lines must be a number") from None
        return JSONResponse(await backend.logs_page(q.get("node") or None, q.get("log") or None, lines))

    async def api_cidr(request: Request) -> Response:
        return JSONResponse(await backend.cidr_page(request.query_params.get("q") or None))

    async def api_commands(request: Request) -> Response:
        return JSONResponse(await backend.commands())

    async def api_command(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await backend.run_command(
            body.get("mode", "broadcast"), body.get("command", ""), node=body.get("node"),
            timeout=body.get("timeout", 3.0), include_managers=body.get("include_managers", False)))

    async def on_action_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ActionError)
        return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)      # browsers ask for it; nothing to show

    routes: list[Any] = [Route(p, page(t, title)) for p, t, title in PAGES]
    routes.append(Route("/favicon.ico", favicon))
    routes += [
        Route("/api/cluster", api_cluster),
        Route("/api/vips", api_vips),
        Route("/api/vips/move", api_vips_move, methods=["POST"]),
        Route("/api/vips/unpin", api_vips_unpin, methods=["POST"]),
        Route("/api/nodes/drain", api_nodes_drain, methods=["POST"]),
        Route("/api/config", api_config),
        Route("/api/logs", api_logs),
        Route("/api/cidr", api_cidr),
        Route("/api/commands", api_commands),
        Route("/api/command", api_command, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={ActionError: on_action_error},
                     middleware=[Middleware(ConsoleGuard, token=token, cookie=cookie)])
