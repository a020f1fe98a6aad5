"""`wecast serve`: the Wecast instance, the scheduler and uvicorn, in one process and one event loop.

Binding: 127.0.0.1 by default (`api.host`). On any other address the server refuses to start without an
API key (`WECAST_API_KEY` or `api.key`), and with a key every endpoint but /healthz and /livez needs it.

Sandbox: serve starts the sandbox *logged out* (whatever `sandbox.auto_login` says: that switch is for the
CLI demo), so the source document's flow (POST /goStart, scan, POST /submit-verify-code) is the real way
in; `api.sandbox_auto_login: true` makes serve log in by itself. A login made earlier is remembered in the
sandbox's state file, as a real session would be.

Stopping (SIGINT / SIGTERM): the scheduler stops firing, `Dispatcher.stop()` lets sends in flight finish
and be recorded; runs still waiting (for a login, quiet hours) keep their deliveries pending for the next
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import uvicorn

from engine.errors import WecastError
from engine.i18n import N_, tr
from engine.scheduler import CampaignScheduler
from engine.service import Wecast
from engine.settings import Settings
from engine.web.app import create_app
from engine.web.security import is_loopback

log = logging.getLogger("wecast.serve")

SWITCH_INTERVAL = 0.001  # seconds a thread may hold the GIL before another runs (see `serve`)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


class _Server(uvicorn.Server):
    """uvicorn's server, with signals handled on the event loop. uvicorn re-raises SIGTERM after its own
    graceful shutdown, which kills the process with -15; `serve` returns 0 after a clean stop instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


def serve_settings(settings: Settings) -> Settings:
    """Settings for serve mode: the sandbox logs in by itself only with `api.sandbox_auto_login`."""
    sandbox = settings.sandbox.model_copy(update={"auto_login": settings.api.sandbox_auto_login})
    return settings.model_copy(update={"sandbox": sandbox})


def configure_logging(level: str) -> None:
    """Log to stderr at `level` unless the caller already configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("wecast").setLevel(level)


# What the system says when a socket cannot bind, in the reader's language.
_LISTEN_PROBLEMS = {
    errno.EADDRNOTAVAIL: N_("this machine has no such address (use 127.0.0.1, 0.0.0.0 or one of its own)"),
    errno.EACCES: N_("not allowed (a port below 1024 needs administrator rights: choose another with --port)"),
}


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything else starts: a port another process holds is one clear error
    before the database is opened, the campaigns loaded or the contacts synced (uvicorn binds only after its
    lifespan has started all of that)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # the connections accepted here inherit it. With proto 0 every answer written in two parts (head, then body)
    # waited for the client's delayed ACK: 40 ms added to each request on a keep-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart is not "in use"
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise WecastError(
                tr(
                    "port {port} on {host} is already in use (another `wecast serve`?): stop that process, "
                    "or choose another port with --port (or api.port in config.yaml)",
                    port=port,
                    host=host,
                )
            ) from None
        said = (
            N_("no such host name (use an address such as 127.0.0.1 or 0.0.0.0)")
            if isinstance(exc, socket.gaierror)
            else _LISTEN_PROBLEMS.get(exc.errno or 0)
        )
        reason = tr(said) if said else exc.strerror or str(exc)  # else the system's own words
        raise WecastError(tr("cannot listen on {host}:{port}: {reason}", host=host, port=port, reason=reason)) from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    """Run the service until SIGINT/SIGTERM. Returns the process exit code (0 after a clean stop)."""
    host = host or settings.api.host
    port = settings.api.port if port is None else port  # 0 is a port to ask for (any free one), not "the default"
    configure_logging(settings.log_level)
    loopback = is_loopback(host)
    if not loopback and settings.api.key is None:
        log.error(
            tr(
                "refusing to listen on {host} without an API key: anyone who can reach it could send messages "
                "as your WeCom account. Set WECAST_API_KEY (or api.key in config.yaml), or bind 127.0.0.1",
                host=host,
            )
        )
        return EXIT_CONFIG
    # Planning, parsing and database calls run in worker threads beside the event loop; they share the GIL.
    # Handing it over every millisecond (Python's default: every 5 ms) lets the loop answer between a plan's
    # steps instead of after several of them.
    sock = listen(host, port)
    port = sock.getsockname()[1]  # the one the system chose for port 0, for the log line
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        # uvloop's event loop (libuv) with httptools' parser (see `_serve`): the loop's and the HTTP layer's own
        # CPU per request is about a third of asyncio's with h11, and under one GIL that CPU sets how many
        # requests a second the server answers.
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(
                _serve(
                    serve_settings(settings),
                    host,
                    port,
                    sock,
                    require_key=not loopback or settings.api.key is not None,
                    loopback=loopback,
                )
            )
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return EXIT_FAILED
    finally:
        sock.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it exists (not on Windows, where pyproject does not install it): asyncio's own there."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(
    settings: Settings, host: str, port: int, sock: socket.socket, *, require_key: bool, loopback: bool
) -> int:
    app = Wecast(settings)
    scheduler = CampaignScheduler(app)
    api = create_app(app, scheduler=scheduler, require_key=require_key, close_app=False, loopback_only=loopback)
    config = uvicorn.Config(
        api,
        host=host,
        port=port,
        log_config=None,
        lifespan="on",
        http="httptools",
        server_header=False,
        timeout_graceful_shutdown=int(settings.api.shutdown_timeout.total_seconds()) + 5,
    )
    server = _Server(config)
    log.info(
        tr(
            "wecast serve: gateway {gateway}, http://{host}:{port} ({key}), campaigns in {folder}",
            gateway=settings.gateway,
            host=host,
            port=port,
            key=tr("API key required") if require_key else tr("no API key needed on loopback"),
            folder=settings.campaigns_dir,
        )
    )
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return int(exc.code) if isinstance(exc.code, int) else EXIT_FAILED
    finally:
        await app.close()
    return EXIT_OK if server.started else EXIT_FAILED
