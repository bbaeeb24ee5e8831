"""The observability HTTP API and dashboard, served by `pyagent observe` and `pyagent serve --data`.

Routes: `GET /api/observability` (the fleet snapshot; `run`, `agent`, `window` filter it),
`/api/observability/schema`, `/api/runs`, `/api/runs/{id}` (the span tree),
`/api/runs/{id}/lineage`,
`/api/stream` (server-sent events, resumable with `Last-Event-ID`), `/metrics` (Prometheus text),
and the dashboard at `/`. Errors are JSON `{"error": {"message", "type"}}`: 400 for bad parameters,
404 for an unknown run, 503 while the data folder cannot be read.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from pyagent import __version__
from pyagent.auth import BearerAuth
from pyagent.errors import ConfigError
from pyagent.observe.live import Observer
from pyagent.observe.metrics import to_prometheus
from pyagent.observe.runviews import lineage, run_detail, run_summary
from pyagent.observe.schema import Error, Lineage, Node, RunDetail, RunList, Snapshot
from pyagent.observe.topology import RECENT
from pyagent.observe.traces import TraceReader

WEB = Path(__file__).resolve().parent / "web"
EVENT_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only, below 2**63
MAX_WINDOW_S = 7 * 24 * 3600
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text} for code, text in (
        (400, "A parameter is invalid."), (401, "The bearer token is missing or wrong."),
        (404, "No such run."), (503, "The data folder cannot be read (the message says why)."))}


class Unavailable(Exception):
    """The data folder cannot be read now."""


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def observer_router(observer: Observer) -> APIRouter:
    """The observability routes over `observer` (add the handlers with `install_handlers`)."""
    router = APIRouter()

    @contextmanager
    def store() -> Iterator[TraceReader]:
        try:
            reader = observer.reader()
        except ConfigError as exc:
            raise Unavailable(str(exc)) from None
        try:
            yield reader
        except sqlite3.Error as exc:
            raise Unavailable(f"{observer.path}: cannot be read ({exc})") from None
        finally:
            reader.close()

    @router.get("/api/observability", response_model=Snapshot, responses=ERRORS)
    def snapshot(request: Request, run: Annotated[list[str], Query(
                     description="Only these runs (repeat the parameter for several).",
                     max_length=100)] = [],  # noqa: B006 (FastAPI copies defaults)
                 agent: Annotated[str | None, Query(
                     description="Only agents whose name contains this.", max_length=200)] = None,
                 window: Annotated[float | None, Query(
                     description="Only nodes seen in the last this many seconds.", gt=0,
                     le=MAX_WINDOW_S)] = None,
                 recent: Annotated[int, Query(
                     description="Latest spans listed per node.", ge=0, le=RECENT)] = RECENT,
                 ) -> Snapshot:
        """The fleet's topology with live figures, its health, alerts and metrics."""
        _once(request, "agent", "window", "recent")
        if observer.error is not None and observer.source().events_read == 0:
            raise Unavailable(observer.error)
        return observer.snapshot(run, agent, window, recent)

    @router.get("/api/observability/nodes/{node_id:path}", response_model=Node,
                responses=ERRORS)
    def node(node_id: str) -> Node:
        """One node of the topology with its figures and latest spans."""
        found = observer.node(node_id)
        if found is None:
            raise HTTPException(404, f"no node {node_id!r} in the fleet")
        return found

    @router.get("/api/observability/schema")
    def schema() -> dict[str, Any]:
        """The JSON Schema of the snapshot (version 1)."""
        return Snapshot.model_json_schema()

    @router.get("/api/runs", response_model=RunList, responses=ERRORS)
    def runs() -> RunList:
        """Every run in the data folder, newest first, with its totals."""
        with store() as reader:
            return RunList(runs=[run_summary(reader, record, observer.pricer)
                                 for record in reader.runs()])

    @router.get("/api/runs/{run_id}", response_model=RunDetail, responses=ERRORS)
    def run(run_id: str) -> RunDetail:
        """One run's span tree: timings, tokens, cost, tool arguments and results, errors."""
        with store() as reader:
            return run_detail(reader, _record(reader, run_id), observer.pricer, observer.redactor)

    @router.get("/api/runs/{run_id}/lineage", response_model=Lineage, responses=ERRORS)
    def run_lineage(run_id: str) -> Lineage:
        """Run -> step -> agent -> sub-agent, with each level's figures."""
        with store() as reader:
            return lineage(reader, _record(reader, run_id), observer.pricer)

    @router.get("/api/stream", responses={200: {"content": {"text/event-stream": {}},
                                                "description": "Server-sent events."},
                                          **ERRORS})
    async def stream(
            request: Request,
            run: Annotated[str | None, Query(description="Only this run's events.",
                                             max_length=200)] = None,
            last_event_id: Annotated[int | None, Query(
                ge=0, lt=2**63,
                description="Resume after this event id (as the Last-Event-ID header).")
            ] = None,
            last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> StreamingResponse:
        """`span` events as they are stored and a `metrics` event every second."""
        _once(request, "run", "last_event_id")
        cursor = last_event_id
        if last_event_id_header is not None and cursor is None:
            if not EVENT_ID.fullmatch(last_event_id_header.strip()):
                raise _BadParameter(f"the Last-Event-ID header must be an event id (a whole "
                                    f"number below 2**63), got {last_event_id_header[:40]!r}")
            cursor = int(last_event_id_header)
        return StreamingResponse(observer.stream(cursor, run or None),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Every metric in the Prometheus text format."""
        return PlainTextResponse(to_prometheus(observer.registry),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def _record(reader: TraceReader, run_id: str) -> Any:
        found = next((r for r in reader.runs() if r.run_id == run_id), None)
        if found is None:
            raise HTTPException(404, f"no run {run_id!r} in {observer.data_dir}")
        return found

    return router


class _BadParameter(Exception):
    pass


def _once(request: Request, *names: str) -> None:
    """Refuse a query that repeats a parameter that takes one value."""
    for name in names:
        if len(request.query_params.getlist(name)) > 1:
            raise _BadParameter(f"invalid parameter {name!r}: give it at most once")


def install_handlers(app: FastAPI, general: bool = True) -> None:
    """JSON errors for an unreadable data folder and a bad Last-Event-ID; with `general`, also
    for invalid parameters and unknown routes or runs (an app that has its own keeps them)."""

    @app.exception_handler(Unavailable)
    async def _unavailable(_request: Request, exc: Unavailable) -> JSONResponse:
        return _error(503, str(exc), "unavailable")

    @app.exception_handler(_BadParameter)
    async def _bad(_request: Request, exc: _BadParameter) -> JSONResponse:
        return _error(400, str(exc), "invalid_request")

    if not general:
        return

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return _error(400, f"invalid parameter {where!r}: {first.get('msg', 'invalid')}",
                      "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail),
                      {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error"))


def add_observer(app: FastAPI, observer: Observer) -> None:
    """Serve the observability API and dashboard from an existing app (`pyagent serve`)."""
    install_handlers(app, general=False)
    app.include_router(observer_router(observer))
    mount_dashboard(app)


def mount_dashboard(app: FastAPI) -> None:
    """The dashboard's page at `/` and its files (vendored, nothing from the network)."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB), name="static")


def public_path(path: str) -> bool:
    """Paths served without the bearer token: the dashboard's own files (no data in them)."""
    return path == "/" or path.startswith("/static/")


def create_observer_app(observer: Observer, token: str | None = None) -> FastAPI:
    """The observer's application: API, stream, metrics and dashboard."""
    app = FastAPI(title="PyAgent observability", version=__version__)
    install_handlers(app)
    app.include_router(observer_router(observer))
    mount_dashboard(app)
    if token is not None:
        app.add_middleware(BearerAuth, token=token,
                           protected=lambda path: not public_path(path))
    return app
