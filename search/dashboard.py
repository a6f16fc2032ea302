"""The Optuna dashboard of a run folder (the optional ``optuna-dashboard`` extra: imported only
when a dashboard is asked for)."""

from __future__ import annotations

import signal
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


def _stop(signum, frame):
    raise KeyboardInterrupt


def serve(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM."""
    # SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does; a job started in the
    # background by a non-interactive shell ignores SIGINT, so SIGTERM is the portable stop.
    signal.signal(signal.SIGTERM, _stop)
    with make_server(host, port, dashboard_app(run_dir)) as server:
        print(f"optuna-dashboard on http://{host}:{server.server_port}/ (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
