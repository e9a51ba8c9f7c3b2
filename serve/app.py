"""The HTTP service: a versioned JSON API, a server-sent-event stream of previews, and the page at ``/``.

A thin layer over :class:`serve.scheduler.Scheduler`, which decodes every request's candidates in shared
batches with the same sampling as ``python -m sample``. Every error is JSON, ``{"error": {"field",
"message", "type"}}``, with a 4xx status for anything a request can do wrong (422 a bad field, 413 a body
too large, 429 a full queue, 408 a request not answered in time, 404/405 an unknown address or method);
nothing in a request names a file on the server: pictures are fetched by random ids from memory, and an
edit's pictures come inside the request as base64 PNG (serve/edits.py).

Routes: ``POST /v1/pictures``, ``POST /v1/pictures/stream`` (text/event-stream), ``GET /v1/pictures/{id}``,
``GET /v1/info``, ``GET /healthz``, ``GET /readyz``, ``GET /openapi.json`` and ``GET /docs`` (the API
read from it), ``GET /`` (the page).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sample.output import picture_fields, picture_png, safe_stem
from sample.pipeline import Picture, Pipeline
from serve.edits import BadField, edit_of
from serve.scheduler import Job, QueueFull, Scheduler
from serve.schemas import ErrorResponse, Limits, PictureOut, PictureRequest, PicturesResponse

__all__ = ["create_app", "ApiError"]

STATIC = Path(__file__).resolve().parent / "static"
PICTURE_ID = r"^[0-9a-f]{32}$"
SEED_DRAW = 2**62  # a drawn seed is below this, so SEED+j fits for any n


class ApiError(StarletteHTTPException):
    """A request the service refuses: its status, the field at fault (or None) and a message saying what to do.

    An HTTPException, so that one raised while FastAPI reads the body (BodyLimit) reaches its handler as it is.
    """

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request"):
        super().__init__(status, message)
        self.status, self.message, self.field, self.kind = status, message, field, kind

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message, "type": self.kind}}


class PictureStore:
    """The last ``size`` kept pictures by id, as PNG bytes with their metadata; the oldest leave first."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[str, tuple[bytes, str]] = OrderedDict()

    def add(self, png: bytes, filename: str) -> str:
        picture_id = secrets.token_hex(16)
        self.items[picture_id] = (png, filename)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return picture_id

    def get(self, picture_id: str) -> tuple[bytes, str] | None:
        return self.items.get(picture_id)


class Service:
    """The scheduler, the limits and the stored pictures behind the routes."""

    def __init__(self, pipeline: Pipeline, limits: Limits):
        self.pipeline = pipeline
        self.limits = limits
        self.scheduler = Scheduler(pipeline, max_rows=limits.max_rows, max_queue=limits.max_queue)
        self.store = PictureStore(limits.stored_pictures)
        self.preview_every = limits.preview_every or pipeline.model.config.grid_size

    def submit(self, body: PictureRequest, stream: bool) -> tuple[Job, asyncio.Queue]:
        """Queue the request; its events arrive on the returned queue, put there from the decode thread."""
        if body.n > self.limits.max_n:
            raise ApiError(422, f"n must be at most {self.limits.max_n} on this service, got {body.n}", "n")
        if body.n * (1 if body.cfg == 1.0 else 2) > self.limits.max_rows:
            raise ApiError(422, f"n={body.n} needs more decoder rows than this service has ({self.limits.max_rows})",
                           "n")
        try:
            edit = edit_of(body, self.pipeline.canvas_size, self.pipeline.token_size)
        except BadField as e:
            raise ApiError(422, str(e), e.field) from None
        seed = body.seed if body.seed is not None else secrets.randbelow(SEED_DRAW)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_event(kind: str, payload: dict) -> None:  # called in the decode thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is gone: the service is shutting down
                pass

        job = Job(body.prompt, body.settings(seed), on_event, self.preview_every if stream else None, edit)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"{e}; try again shortly", None, "queue_full") from None
        return job, events

    def response(self, body: PictureRequest, job: Job, pictures: list[Picture], started: float | None) -> dict:
        """The kept pictures, stored for GET /v1/pictures/{id}, as the response's JSON."""
        out = []
        for picture in (p for p in pictures if p.kept):
            png = picture_png(picture)
            picture_id = self.store.add(png, f"{safe_stem(picture.prompt)}-seed{picture.seed}.png")
            out.append(PictureOut(id=picture_id, url=f"/v1/pictures/{picture_id}", seed=picture.seed,
                                  score=picture.score, rank=picture.rank, candidate=picture.candidate,
                                  likelihood=picture.likelihood,
                                  png_base64=base64.b64encode(png).decode() if body.response_format == "base64"
                                  else None))
        now = time.monotonic()
        settings = {k: v for k, v in picture_fields(pictures[0])["settings"].items() if k != "rerank"}
        return PicturesResponse(
            id=secrets.token_hex(8), prompt=job.prompt, settings={**settings, "seed": job.settings.seed},
            truncated=job.truncated, pictures=out, queued_s=round((started or now) - job.created, 4),
            total_s=round(now - job.created, 4)).model_dump()


async def _events(job: Job, events: asyncio.Queue, service: Service) -> AsyncIterator[tuple[str, dict]]:
    """The job's events until done or error; past the service's timeout an ApiError 408 (and the job dropped)."""
    deadline = job.created + service.limits.timeout_s
    finished = False
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), deadline - time.monotonic())
            except (TimeoutError, asyncio.TimeoutError):
                raise ApiError(408, f"not answered within the service's {service.limits.timeout_s:g} s; ask for a "
                                    "smaller n or try again when it is less busy", None, "timeout") from None
            finished = kind in ("done", "error")
            yield kind, payload
            if finished:
                return
    finally:
        if not finished:  # a timeout, or the client went away
            service.scheduler.cancel(job)


def create_app(pipeline: Pipeline, limits: Limits | None = None) -> FastAPI:
    """The service for a loaded pipeline; the decode thread starts and stops with the app's lifespan."""
    limits = limits or Limits()
    service = Service(pipeline, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.scheduler.close)

    app = FastAPI(title="tilecraft", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Text to picture. Every error is JSON naming the field at fault.")
    app.state.service = service
    _error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.post("/v1/pictures", response_model=PicturesResponse, responses={
        408: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
        429: {"model": ErrorResponse}})
    async def create_pictures(body: PictureRequest) -> dict:
        """Draw the candidates and return the kept pictures, best first, each with its seed and score."""
        job, events = service.submit(body, stream=False)
        started = None
        async for kind, payload in _events(job, events, service):
            if kind == "started":
                started = time.monotonic()
            elif kind == "error":
                raise ApiError(503, payload["message"], None, "unavailable")
            elif kind == "done":
                return service.response(body, job, payload["pictures"], started)
        raise AssertionError("unreachable: the event loop ends with done or error")

    @app.post("/v1/pictures/stream", responses={200: {"content": {"text/event-stream": {}}},
                                                 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                                                 429: {"model": ErrorResponse}})
    async def stream_pictures(body: PictureRequest) -> StreamingResponse:
        """Server-sent events: queued, started, preview (every grid row, and once all is drawn: step, of, and
        every candidate as base64 PNG, the cells still to draw grey), then done (the same JSON as POST
        /v1/pictures) or error ({"error": ...}, also when the service's timeout passes)."""
        job, events = service.submit(body, stream=True)

        async def sse() -> AsyncIterator[str]:
            yield _sse("queued", {"queue": service.scheduler.queue_length})
            started = None
            try:
                async for kind, payload in _events(job, events, service):
                    if kind == "started":
                        started = time.monotonic()
                        yield _sse("started", {})
                    elif kind == "preview":
                        images = [base64.b64encode(_png(image)).decode() for image in payload["images"]]
                        yield _sse("preview", {"step": payload["step"], "of": payload["of"], "images": images})
                    elif kind == "done":
                        yield _sse("done", service.response(body, job, payload["pictures"], started))
                    else:
                        yield _sse("error", ApiError(503, payload["message"], None, "unavailable").body())
            except ApiError as e:
                yield _sse("error", e.body())

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/v1/pictures/{picture_id}", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}})
    async def get_picture(picture_id: str) -> Response:
        """A kept picture's PNG, with prompt, seed, rank, score and settings in its text chunks."""
        found = service.store.get(picture_id) if re.fullmatch(PICTURE_ID, picture_id) else None
        if found is None:
            raise ApiError(404, "no such picture here (pictures are kept for a while, the oldest leave first)",
                           "picture_id", "not_found")
        png, filename = found
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/v1/info")
    async def info() -> dict:
        """The sampling defaults, the limits and the model's picture size: what the page fills its controls with."""
        config = pipeline.model.config
        fields = PictureRequest.model_fields
        defaults = {name: fields[name].default
                    for name in ("n", "keep", "top_k", "top_p", "temperature", "cfg", "shortlist",
                                 "likelihood_weight")}
        return {"defaults": defaults, "limits": {"max_n": limits.max_n, "max_rows": limits.max_rows,
                                                 "max_queue": limits.max_queue, "max_body_bytes": limits.max_body_bytes,
                                                 "timeout_s": limits.timeout_s},
                "model": {"run": pipeline.run.name, "grid_size": config.grid_size, "canvas": pipeline.canvas_size,
                          "token_size": pipeline.token_size, "rerank": pipeline.scorer is not None}}

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        """The decode thread runs and takes requests; 503 while it loads or after it stopped."""
        scheduler = service.scheduler
        if not scheduler.ready or scheduler.thread is None or not scheduler.thread.is_alive():
            raise ApiError(503, "the decoder is not running yet", None, "unavailable")
        return {"status": "ready", "queue": scheduler.queue_length, "busy_rows": scheduler.busy_rows,
                "max_rows": limits.max_rows, "steps": scheduler.steps, "rows_decoded": scheduler.rows_decoded,
                "decode_busy_s": round(scheduler.busy_s, 3), "render_busy_s": round(scheduler.render_busy_s, 3),
                "threads": _thread_times({**scheduler.thread_ids, "event_loop": threading.get_native_id()}),
                "process_cpu_s": round(time.process_time(), 3)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    return app


def _thread_times(thread_ids: dict[str, int]) -> dict:
    """Each thread's seconds so far on a core (cpu_s) and runnable but waiting for one (runqueue_s), from Linux's
    schedstat; a thread neither running nor runnable sleeps (on a lock, the GIL, or for work). Empty elsewhere."""
    times = {}
    for name, tid in thread_ids.items():
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                on_cpu, waiting = (int(v) / 1e9 for v in f.read().split()[:2])
        except (OSError, ValueError):
            continue
        times[name] = {"cpu_s": round(on_cpu, 3), "runqueue_s": round(waiting, 3)}
    return times


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(loc) or "body"
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            field, message = "body", "the body is not valid JSON: " + str(first.get("ctx", {}).get("error", message))
        elif first.get("type") == "missing" and not loc:
            field, message = "body", "a JSON object is needed as the body"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        return JSONResponse({"error": {"field": field, "message": f"{field}: {message}", "type": first.get("type")}},
                            status_code=422)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:  # the service's fault, never a request's
        return JSONResponse({"error": {"field": None, "message": "internal error; see the server's log",
                                       "type": "internal"}}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
        field = "body" if e.status_code == 400 else None  # FastAPI's 400: a body it could not parse
        return JSONResponse({"error": {"field": field, "message": str(e.detail),
                                       "type": kinds.get(e.status_code, "http_error")}},
                            status_code=e.status_code, headers=getattr(e, "headers", None))


class BodyLimit:
    """Refuse with 413 any request body over ``max_bytes``, by its Content-Length or as it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = ApiError(413, f"the body is over {self.max_bytes} bytes, the most this service reads", "body",
                             "too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)  # the ApiError reaches the app's handler: a 413
