"""Running the web app: on a thread inside ``ainode serve``, or on its own (``ainode web``).

Why uvicorn's Server object rather than ``uvicorn.run``: inside the node the
signals belong to the service (node.cli.serve_cmd), so the server must not
install its own handlers, and it must stop when the service stops.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from node.web.app import create_app
from node.web.context import WebContext
from storage.errors import ConfigError

__all__ = ["WebServer"]

log = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the node's own handlers stay in charge
        pass


class WebServer:
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        web = ctx.config.web
        self.config = uvicorn.Config(
            create_app(ctx), host=web.host, port=web.port, log_config=None,
            access_log=False, ssl_certfile=str(web.cert_file) if web.cert_file else None,
            ssl_keyfile=str(web.key_file) if web.key_file else None, timeout_keep_alive=30,
            limit_concurrency=64)
        self.server = _QuietServer(self.config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        web = self.ctx.config.web
        scheme = "https" if web.cert_file else "http"
        return f"{scheme}://{web.host}:{web.port}/"

    def start(self, timeout_s: float = 20.0) -> None:
        """Serve on a thread; returns once the port listens (ConfigError if it cannot)."""
        self._thread = threading.Thread(target=self.server.run, name="ainode-web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise ConfigError(f"web console could not listen on {self.url}")
            if time.monotonic() > deadline:
                raise ConfigError(f"web console did not start within {timeout_s:.0f} s")
            time.sleep(0.05)
        log.info("web console listening", extra={"url": self.url})

    def run(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (uvicorn's own handlers)."""
        uvicorn.Server(self.config).run()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        self.ctx.close()
