"""console: the web console of a manager (see docs/CONSOLE.md).

Runs uvicorn inside the service's own event loop, bound to the manager's
``console_address:console_port`` (127.0.0.1:7480 by default). Every manager serves one,
so losing a manager loses only its console. The token comes from
``<keys dir>/console.token`` (made when missing); ``ecluster console url`` prints the link.

A port that is taken is retried every few seconds (alarm ``console.bind``), so the
service keeps its other work (RPC) going and the console comes up once the port is free.

RPC: ``status()`` -> ``{"url", "listening", "error"}`` (no token in it).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket

from services.base import Service, rpc
from bus import roles as access

BIND_RETRY_S = 2.0


def console_url(address: str, port: int, token: str | None = None) -> str:
    """``http://address:port/`` (IPv6 in brackets), with ``?token=`` when given. Pure."""
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


def bind_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ConsoleService(Service):
    name = "console"
    roles = ("manager",)
    builtin = True

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.server = None
        self.task: asyncio.Task | None = None
        self.listening = False
        self.error: str | None = None

    async def handle_init(self) -> None:
        from manager.console.auth import cookie_name, ensure_token
        token = await self.offload(ensure_token, self.cluster.keys_dir)
        self.app = self.make_app(token, cookie_name(self.member.console_port))
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def make_app(self, token: str, cookie: str):
        from manager.console.app import create_app
        from manager.console.backend import BusBackend
        return create_app(BusBackend(self.cluster, self.member.name, self.call), token, cookie)

    async def _serve(self) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            # the service owns SIGTERM/SIGINT (Service.run); uvicorn must not take them over
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        addr, port = self.member.console_address, self.member.console_port
        alarmed = False
        while True:
            try:
                sock = bind_socket(addr, port)
            except OSError as e:
                self.error = f"cannot listen on {addr}:{port}: {e.strerror or e}"
                if not alarmed:
                    await self.alarm("console.bind", self.error)
                    alarmed = True
                await asyncio.sleep(BIND_RETRY_S)
                continue
            break
        self.error = None
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                server_header=False, proxy_headers=False, ws="none", http="h11",
                                timeout_graceful_shutdown=1)
        self.server = Server(config)
        self.listening = True
        self.log.info("console on %s", console_url(addr, port))
        try:
            await self.server.serve(sockets=[sock])
        finally:
            self.listening = False
            sock.close()

    async def handle_stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), 3.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                self.task.cancel()

    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        return {"url": console_url(self.member.console_address, self.member.console_port),
                "listening": self.listening, "error": self.error}
