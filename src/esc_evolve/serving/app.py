"""`create_app(...)`: the OpenAI-compatible HTTP server of `esc-evolve serve` (docs/serving.md, "API").

    POST   /v1/chat/completions   one reply to a chat; `stream: true` for server-sent events; `user` = seeker id
    GET    /v1/models             the one model served
    GET    /healthz               liveness, and how many requests wait for the engine
    GET    /                      the chat page (serving/static/index.html: one file, no build step)
    GET    /v1/seekers/{id}       everything stored about a seeker (conversation and inferred profiles)
    DELETE /v1/seekers/{id}       erase it

Every reply is one `ChatSession.reply` (serving/session.py): the seeker's last message goes through the safety
guard before the model (an urgent message gets the safe reply, sent like any reply and flagged in the response's
`esc_evolve` field), the model's reply through the guard's checks before it is sent, the exchange into the
store when it is on, and every few seeker turns the profile is inferred in the background. The model itself is
reached only through the `Batcher` (serving/batching.py): concurrent requests share engine calls.

Requests are checked before anything runs: the bearer key (when `serve.api_key_env` names a set variable), the
body size, then the JSON and each limit of `ServeSettings`; every refusal is a 4xx in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) whose `code` names the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from esc_evolve.config import ExperimentConfig, SafetySettings
from esc_evolve.evolve.principles import load_principles
from esc_evolve.generation.types import GenerationError, GenerationRequest, GenerationResult, Generator
from esc_evolve.safety.detector import RiskAssessment
from esc_evolve.safety.guard import SafetyGuard
from esc_evolve.safety.reply import resources_for
from esc_evolve.serving.batching import Batcher, BatcherClosed, Job
from esc_evolve.serving.session import ChatSession, ReplyInterrupted
from esc_evolve.serving.store import SeekerStore

log = logging.getLogger(__name__)

MAX_SEEKER_ID = 200
MAX_STOPS = 4  # as OpenAI's API
_END = object()


# ---------------------------------------------------------------------------------------------------------
# The request body (OpenAI's chat completions; fields not listed are accepted and ignored)


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, min_length=1, max_length=MAX_SEEKER_ID)
    n: int = Field(1, ge=1)


class ApiError(Exception):
    """A refused request: answered with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, code=self.code, param=self.param, kind=self.kind)


def error_response(
    status: int, message: str, *, code: str | None = None, param: str | None = None, kind: str = "invalid_request_error"
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class _Turn:
    """A checked request: what the session needs to answer it."""

    seeker: str | None
    message: str
    history: list[dict[str, str]]
    system: str
    overrides: dict[str, Any]
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------------------------------------
# The app


def create_app(
    generator: Generator,
    config: ExperimentConfig,
    guard: SafetyGuard,
    store: SeekerStore,
    model_name: str,
) -> FastAPI:
    """The server around `generator`: `config.serve` (limits, auth, batching, profile memory), `config.safety`
    (through `guard`), `config.data.system_prompt` (the system message when a request has none),
    `config.generation` (default max_tokens and temperature), `config.evolve.principles_path` (profile fields).
    The API key is read from the environment when the app is created."""
    server = _Server(generator, config, guard, store, model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="esc-evolve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    key = os.environ.get(config.serve.api_key_env) or None
    if key is not None:
        app.add_middleware(BearerAuth, key=key)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _engine_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(400, first["msg"], param=".".join(str(p) for p in first["loc"]), code="invalid_request")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        turn = server.check(await _read_body(request, config.serve.max_body_bytes))
        return await server.answer(turn)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": server.started, "owned_by": "esc-evolve"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queued": server.batcher.queued}

    @app.get("/v1/seekers/{seeker:path}")  # an id may hold a slash (sent as %2F)
    async def export_seeker(seeker: str) -> dict[str, Any]:
        _check_seeker_id(seeker)
        return {**await server.in_thread(store.export, seeker), "store": store.enabled}

    @app.delete("/v1/seekers/{seeker:path}")
    async def forget_seeker(seeker: str) -> dict[str, Any]:
        _check_seeker_id(seeker)
        return {"seeker": seeker, "deleted": await server.forget(seeker)}

    return app


# The page holds no data and a browser cannot send a bearer key when it opens a URL: it is the one path served
# without the key (the page asks for it and sends it with every API call). It talks to this server only.
PAGE = (resources.files("esc_evolve.serving") / "static" / "index.html").read_text(encoding="utf-8")
PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
OPEN_PATHS = {("GET", "/")}


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY` (compared in constant time), except
    the page at `/`."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) not in OPEN_PATHS:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
                response = error_response(401, message, code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server:
    """What the routes share: the engine's batcher, the guard, the store, the settings, the request threads."""

    def __init__(
        self, generator: Generator, config: ExperimentConfig, guard: SafetyGuard, store: SeekerStore, model_name: str
    ) -> None:
        self.generator = generator
        self.config = config
        self.serve = config.serve
        self.guard = _OneAtATime(guard)
        self.store = store
        self.memory = _Memory(store)
        self.nowhere = SeekerStore(None, enabled=False)  # requests without a seeker id keep nothing
        self.model_name = model_name
        self.principles = load_principles(config.evolve.principles_path)
        # A remote engine batches what it receives itself: as many requests in flight as its client allows.
        self.remote = remote = config.generation.backend == "openai"
        self.batcher = Batcher(
            generator,
            window_ms=self.serve.batch_window_ms,
            max_batch=self.serve.max_batch,
            max_wait_ms=self.serve.batch_max_wait_ms,
            workers=config.generation.openai.max_concurrency if remote else 1,
        )
        self.started = int(time.time())
        self.threads: ThreadPoolExecutor | None = None
        self._profiling: dict[str, Job] = {}
        self._profiling_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        # A request waits for the engine in one of these threads (ChatSession is synchronous), so there are
        # enough for two full batches plus the requests being read and checked.
        self.threads = ThreadPoolExecutor(2 * self.serve.max_batch + 8, thread_name_prefix="esc-evolve-request")
        self.batcher.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.batcher.stop)
        if self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _submit(self, fn: Any, *args: Any) -> Future:
        assert self.threads is not None, "the app is not started (run it with uvicorn, which starts its lifespan)"
        return self.threads.submit(fn, *args)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Checking a request -------------------------------------------------------------------------------
    def check(self, body: bytes) -> _Turn:
        """The request as a `_Turn`, or an `ApiError` naming what is wrong or which limit it exceeds."""
        serve = self.serve
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        if isinstance(raw.get("messages"), list) and len(raw["messages"]) > serve.max_messages:
            raise _limit("messages", f"{len(raw['messages'])} messages", serve.max_messages, "max_messages")
        try:
            request = ChatCompletionRequest.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where, code="invalid_request") from None
        texts = [m.text for m in request.messages]
        for i, text in enumerate(texts):
            if len(text) > serve.max_chars_per_message:
                where = f"messages[{i}].content"
                raise _limit(where, f"{len(text)} characters", serve.max_chars_per_message, "max_chars_per_message")
        asked = request.max_completion_tokens or request.max_tokens
        if asked is not None and asked > serve.max_tokens_cap:
            raise _limit("max_tokens", f"max_tokens={asked}", serve.max_tokens_cap, "max_tokens_cap")
        if request.temperature is not None and request.temperature > serve.max_temperature:
            raise _limit("temperature", f"temperature={request.temperature}", serve.max_temperature, "max_temperature")
        if request.n != 1:
            raise ApiError(400, "only n=1 is served", param="n", code="unsupported")
        return self._turn(request, texts)

    def _turn(self, request: ChatCompletionRequest, texts: list[str]) -> _Turn:
        roles = ["system" if m.role == "developer" else m.role for m in request.messages]
        if "system" in roles[1:]:
            raise ApiError(400, "a system message may only come first", param="messages", code="invalid_request")
        if roles[-1] != "user":
            raise ApiError(400, "the last message must be the seeker's (role 'user')", param="messages")
        if not texts[-1].strip():
            raise ApiError(400, "the last message is empty", param="messages", code="invalid_request")
        start = 1 if roles[0] == "system" else 0
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop", code="invalid_request")
        asked = request.max_completion_tokens or request.max_tokens
        return _Turn(
            seeker=request.user,
            message=texts[-1],
            history=[{"role": r, "content": t} for r, t in zip(roles[start:-1], texts[start:-1], strict=True)],
            system=texts[0] if start else self.config.data.system_prompt,
            overrides={
                "max_new_tokens": asked or min(self.config.generation.max_new_tokens, self.serve.max_tokens_cap),
                "temperature": request.temperature,
                "top_p": request.top_p,
                "stop": tuple(stops),
            },
            stream=request.stream,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )

    # Answering -------------------------------------------------------------------------------------------
    async def answer(self, turn: _Turn) -> Any:
        announced = self.batcher.announce()  # the engine may wait for this request while the guard reads it
        try:
            opened = await self.in_thread(self._open, turn, announced)  # the guard reads it; the turn is kept
        except BaseException:
            announced()
            raise
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if turn.stream:
            events = self._events(turn, opened, reply_id, created)
            return _ClosingStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text = await self.in_thread(lambda: "".join(opened.pieces))
        except Exception as exc:
            raise _engine_error(exc, remote=self.remote) from None
        finally:
            announced()
        self._maybe_profile(turn, opened.session)
        result = opened.calls.result
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _finish(opened, result),
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
            "esc_evolve": _meta(turn, opened, self.config.safety),
        }

    def _open(self, turn: _Turn, announced: Callable[[], None]) -> _Opened:
        """A session for the request, its reply started: the guard has read the message (so `session.last` says
        whether the safe reply answers) and the seeker's message is stored; the pieces are not produced yet."""
        store = self.memory.view(turn.seeker) if turn.seeker is not None else self.nowhere
        session = ChatSession(
            self.generator,
            self.guard,  # type: ignore[arg-type]  # the guard, one request thread at a time
            store,  # type: ignore[arg-type]  # the store as this request may write it
            turn.seeker or "anonymous",
            system_prompt=turn.system,
            use_profile=self.serve.use_profile and turn.seeker is not None,
            profile_every=self.serve.profile_every,
            principles=self.principles,
        )
        calls = _EngineCalls(self.batcher, stream=turn.stream, announced=announced)
        pieces = session.reply(turn.message, history=turn.history, stream=calls, **turn.overrides)
        if session.last.get("safe_reply"):
            announced()  # answered without the engine
        return _Opened(session, pieces, calls, profile_used=session.use_profile and session.profile is not None)

    async def _events(self, turn: _Turn, opened: _Opened, reply_id: str, created: int) -> AsyncIterator[str]:
        """The reply as OpenAI's `chat.completion.chunk` events, then `data: [DONE]`. A client that goes away
        cancels its engine request (see serving/batching.py) and closes its session (what was sent is kept)."""

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
                **extra,
            }
            return _sse(body)

        pending: Future | None = None
        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""}, esc_evolve=_meta(turn, opened, self.config.safety))
            while True:
                pending = self._submit(next, opened.pieces, _END)
                piece = await asyncio.wrap_future(pending)
                pending = None
                if piece is _END:
                    break
                if piece:
                    yield chunk({"content": piece})
            finished = True
            result = opened.calls.result
            yield chunk({}, _finish(opened, result), esc_evolve=_meta(turn, opened, self.config.safety))
            if turn.include_usage:
                yield _sse({**_stream_head(reply_id, created, self.model_name), "choices": [], "usage": _usage(result)})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the engine failed after the stream began: say so in the stream
            finished = True
            error = _engine_error(exc, remote=self.remote)
            yield _sse({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
            yield "data: [DONE]\n\n"
        finally:
            opened.calls.announced()
            if not finished:  # the client went away (or the server is stopping)
                opened.calls.cancel()
                self._spawn(self._close(opened.pieces, pending))
        self._maybe_profile(turn, opened.session)

    async def _close(self, pieces: Iterator[str], pending: Future | None) -> None:
        """Close a session whose client went away, once the thread reading its pieces has let go of it."""
        if pending is not None:
            # A read the client's cancellation caught before a thread took it is cancelled, never run: awaiting
            # it raises CancelledError, which must not skip the close (the reply would never be stored).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wrap_future(pending)
        with contextlib.suppress(Exception):
            await self.in_thread(pieces.close)  # type: ignore[attr-defined]

    # Profile memory and the seeker's controls -----------------------------------------------------------
    def _maybe_profile(self, turn: _Turn, session: ChatSession) -> None:
        """Every `serve.profile_every` seeker turns, infer the profile on the engine's worker, after the batches
        already queued (one at a time per seeker). Nothing when the request has no seeker or nothing is stored."""
        seeker = turn.seeker
        if seeker is None or not self.store.enabled or not session.profile_due():
            return

        def update(_: Generator) -> dict[str, Any] | None:
            try:
                return session.maybe_update_profile()
            except Exception as exc:  # a profile that cannot be inferred must not take the server down
                log.warning("profile of seeker %r not updated: %s", seeker, exc)
                return None
            finally:
                with self._profiling_lock:
                    self._profiling.pop(seeker, None)

        with self._profiling_lock:
            if seeker in self._profiling:
                return
            self._profiling[seeker] = self.batcher.call(update)

    async def forget(self, seeker: str) -> bool:
        """Erase the seeker's conversation and profiles; a profile still queued for them is dropped, and writes
        of their requests still in flight are refused (see `_Memory`)."""
        with self._profiling_lock:
            job = self._profiling.pop(seeker, None)
        if job is not None:
            job.cancel()
        removed = await self.in_thread(self.memory.forget, seeker)
        log.info("seeker %r: everything stored about them deleted (%s)", seeker, "some" if removed else "none held")
        return removed


@dataclass
class _Opened:
    session: ChatSession
    pieces: Iterator[str]
    calls: _EngineCalls
    profile_used: bool = False


class _EngineCalls:
    """The `stream` a session generates with: its request goes through the batcher. Keeps the engine's
    result (token counts, finish reason) and can cancel the request when the client goes away."""

    def __init__(self, batcher: Batcher, *, stream: bool, announced: Callable[[], None]) -> None:
        self.batcher = batcher
        self.stream = stream
        self.announced = announced
        self.result: GenerationResult | None = None
        self._jobs: list[Job] = []
        self._cancelled = False
        self._lock = threading.Lock()

    def __call__(self, request: GenerationRequest) -> Iterator[str]:
        job = self.batcher.submit(request, stream=self.stream, announced=self.announced)
        with self._lock:
            self._jobs.append(job)
            if self._cancelled:
                job.cancel()
        try:
            yield from job.pieces()
            self.result = job.result()
        except BatcherClosed:
            if not self._cancelled:
                raise
        if self._cancelled:  # the reply is not complete: the session must not finish it as if it were
            raise ReplyInterrupted("the client went away before the reply was complete")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for job in self._jobs:
                job.cancel()


class _ClosingStream(StreamingResponse):
    """A streaming response that closes its events when the response ends, however it ends. Starlette leaves an
    iterator suspended at a `yield` when the client goes away (the send fails), so its `finally` (cancel the engine
    call, store what was sent) would wait for garbage collection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class _OneAtATime:
    """The guard as request threads share it: one assessment at a time (the detector's fast tokenizer must not
    be called from two threads at once)."""

    def __init__(self, guard: SafetyGuard) -> None:
        self.guard = guard
        self.settings = guard.settings
        self._lock = threading.Lock()

    def before(self, message: str, history: Any = None) -> Any:
        with self._lock:
            return self.guard.before(message, history)

    def after(self, reply: str, assessment: Any) -> str:
        return self.guard.after(reply, assessment)


class _Memory:
    """The store as requests write it. Forgetting wins over requests in flight: a request that began before its
    seeker was forgotten writes nothing afterwards (its session's turns and profile are dropped)."""

    def __init__(self, store: SeekerStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._forgotten: dict[str, int] = {}

    def view(self, seeker: str) -> _SeekerView:
        with self._lock:
            return _SeekerView(self, self._forgotten.get(seeker, 0))

    def forget(self, seeker: str) -> bool:
        with self._lock:
            self._forgotten[seeker] = self._forgotten.get(seeker, 0) + 1
            return self.store.forget(seeker)

    def write(self, seeker: str, since: int, fn: Any, *args: Any) -> Any:
        with self._lock:
            if self._forgotten.get(seeker, 0) != since:
                return None
            return fn(seeker, *args)


@dataclass
class _SeekerView:
    """`SeekerStore`'s interface for one request's session (reads pass through, writes go through `_Memory`)."""

    memory: _Memory
    since: int
    enabled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.enabled = self.memory.store.enabled

    def conversation(self, seeker: str) -> list[dict[str, Any]]:
        return self.memory.store.conversation(seeker)

    def profile(self, seeker: str) -> dict[str, Any] | None:
        return self.memory.store.profile(seeker)

    def seeker_turns(self, seeker: str) -> int:
        return self.memory.store.seeker_turns(seeker)

    def add_turn(self, seeker: str, role: Any, text: str, meta: dict[str, Any] | None = None) -> int:
        turn = self.memory.write(seeker, self.since, self.memory.store.add_turn, role, text, meta)
        return -1 if turn is None else turn

    def save_profile(self, seeker: str, profile: dict[str, Any], turn: int) -> None:
        self.memory.write(seeker, self.since, self.memory.store.save_profile, profile, turn)


# ---------------------------------------------------------------------------------------------------------
# Helpers


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is longer than `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> ApiError:
    message = f"the body has {size} bytes or more; the limit is {limit} (serve.max_body_bytes)"
    return ApiError(413, message, code="max_body_bytes")


def _limit(param: str, what: str, limit: float, setting: str) -> ApiError:
    return ApiError(400, f"{param}: {what} exceed(s) the limit of {limit} (serve.{setting})", param=param, code=setting)


def _check_seeker_id(seeker: str) -> None:
    if len(seeker) > MAX_SEEKER_ID:
        raise ApiError(400, f"a seeker id has at most {MAX_SEEKER_ID} characters", param="id", code="invalid_request")


def _engine_error(exc: BaseException, *, remote: bool = False) -> ApiError:
    """The answer for a failure: a local engine's `GenerationError` is about the request (too long for the
    model: 400, said as it is); a remote engine's is the engine's (502; its address and answer only in the log)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, GenerationError) and remote:
        log.warning("the remote engine failed: %s", exc)
        return ApiError(502, "the generation engine failed to answer (see the server's log)", code="engine_error")
    if isinstance(exc, GenerationError):
        return ApiError(400, str(exc), code="generation_failed")
    if isinstance(exc, BatcherClosed):
        return ApiError(503, str(exc), code="unavailable", kind="server_error")
    log.exception("request failed", exc_info=exc)
    return ApiError(500, "the server failed to answer (see its log)", code="server_error", kind="server_error")


def _meta(turn: _Turn, opened: _Opened, settings: SafetySettings) -> dict[str, Any]:
    """The response's `esc_evolve` field: what the safety layer saw and did, and whether a profile was used."""
    last = opened.session.last
    helped = any(last.get(k) for k in ("safe_reply", "replaced", "resources_added"))
    return {
        "seeker": turn.seeker,
        "safety": last.get("assessment"),
        "safe_reply": bool(last.get("safe_reply")),
        "replaced": bool(last.get("replaced")),
        "resources_added": bool(last.get("resources_added")),
        "resources": _resources(last.get("assessment"), settings) if helped else None,
        "profile_used": opened.profile_used,
    }


def _resources(assessment: dict[str, Any] | None, settings: SafetySettings) -> dict[str, Any]:
    """The emergency note and the crisis lines the safe reply gave, for a client to show apart from the text."""
    found = RiskAssessment(**{**assessment, "categories": tuple(assessment["categories"])}) if assessment else None
    lines = resources_for(found, settings) if found else settings.resources
    return {
        "emergency_note": settings.emergency_note,
        "lines": [r.model_dump(include={"name", "contact", "region"}) for r in lines],
    }


def _finish(opened: _Opened, result: GenerationResult | None) -> str:
    last = opened.session.last
    if result is None or last.get("safe_reply") or last.get("replaced"):
        return "stop"
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result: GenerationResult | None) -> dict[str, int]:
    prompt, completion = (result.prompt_tokens, result.num_tokens) if result is not None else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream_head(reply_id: str, created: int, model: str) -> dict[str, Any]:
    return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model}


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------------
# Running it

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serve(
    config: ExperimentConfig,
    *,
    model_name: str,
    adapter: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> None:
    """Load the engine (`config.model`, `config.generation`, `adapter`), the safety guard and the store, and
    serve on `config.serve.host:port` until interrupted. `tokenizer` is a remote engine's tokenizer (the openai
    backend has none of its own), which profile memory needs to ask reflection's fields."""
    import uvicorn

    from esc_evolve.generation import build_generator

    settings = config.serve
    if settings.host not in LOOPBACK and not os.environ.get(settings.api_key_env):
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the model and read "
            "stored conversations; set $%s (and put a TLS proxy in front)",
            settings.host,
            settings.api_key_env,
        )
    guard = SafetyGuard(config.safety)  # loads the risk detector (trained once per machine, then cached)
    store = SeekerStore(settings.db_path, enabled=settings.store)
    log.info("seeker store: %s", store.path if settings.store else "off (nothing is kept)")
    with build_generator(config.model, config.generation, adapter, seed=config.run.seed) as generator:
        if tokenizer is not None and generator.tokenizer is None:
            generator.tokenizer = tokenizer
        app = create_app(generator, config, guard, store, model_name)
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None)
