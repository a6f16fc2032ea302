"""The Optuna dashboard of a run folder (the optional ``optuna-dashboard`` extra: imported only
when a dashboard is asked for)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from wsgiref.simple_server import make_server

from search.artifacts import ARTIFACTS
from search.rundir import journal_path, journal_storage
from space.errors import require_extra


def check_available() -> None:
    require_extra("optuna_dashboard", "dashboard", "the dashboard")


def dashboard_app(run_dir: Path):
    """The optuna-dashboard WSGI app of a run folder (study and artifacts)."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    path = journal_path(run_dir)
    artifacts = path.parent / ARTIFACTS
    artifacts.mkdir(exist_ok=True)
    return wsgi(journal_storage(path), artifact_store=FileSystemArtifactStore(str(artifacts)))


def serve(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM."""
    serve_app(dashboard_app(run_dir), host=host, port=port)


def serve_app(app, *, host: str, port: int) -> None:
    """Serve a WSGI app until SIGTERM (a service manager, `kill`) or Ctrl-C; the request in flight
    is answered, then the process returns normally."""
    with make_server(host, port, app) as server:
        def stop(signum, frame):
            # Raising KeyboardInterrupt here would be swallowed whenever the signal lands inside a
            # request (wsgiref answers it with a 500 and keeps serving): ask the loop to stop instead.
            # shutdown() waits for serve_forever to return, so it cannot run on this (the serving) thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

        # SIGTERM is the portable stop: a job started in the background by a non-interactive shell
        # ignores SIGINT (and keeps ignoring it here).
        signal.signal(signal.SIGTERM, stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, stop)
        print(f"optuna-dashboard on http://{host}:{server.server_port}/ (Ctrl-C stops it)", flush=True)
        server.serve_forever()
