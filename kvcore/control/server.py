"""The controller: a FastAPI app holding the global index and relaying commands to instances.

Instances register, stream admissions/evictions and heartbeats, and long-poll
``GET /v1/instances/{id}/commands`` for work; a mutation (clear, pin, move) is queued for the
instances concerned and answered when they report the result (or after
``command_timeout_s``). All state lives in one event loop: run a single worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

import kvcore
from kvcore.control import docs_assets
from kvcore.control import models as m
from kvcore.control.index import GlobalIndex, InstanceState, ServedModel
from kvcore.control.namespaces import namespace_listing, reported_namespaces
from kvcore.control.prometheus import CONTENT_TYPE, Families
from kvcore.control.settings import ControllerSettings
from kvcore.keys import KEY_BYTES
from kvcore.metrics import Metrics

_KEY_HEX = re.compile(rf"[0-9a-f]{{{2 * KEY_BYTES}}}")


class ErrorResponse(BaseModel):
    detail: str


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever strings it holds: lone surrogates come out escaped instead
    of failing the response with a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False,
                              separators=(",", ":")).encode()


def _printable(value: Any) -> Any:
    """A validation error's parts with lone surrogates replaced (U+FFFD)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token"},
    403: {"model": ErrorResponse, "description": "Wrong bearer token"},
    413: {"model": ErrorResponse, "description": "Request too large"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown instance or tier"}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "An instance could not do it"}}


CONTROLLER_LABELS = {
    "controller_commands_total": "op",
    "controller_command_failures_total": "op",
    "controller_events_total": "kind",
    "controller_auth_failures_total": "reason",
}


@dataclass
class Channel:
    """Commands waiting for one instance, and the futures of those it has not answered."""

    queue: deque = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    pending: dict[str, asyncio.Future] = field(default_factory=dict)

    def fail_all(self, why: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_result(m.CommandResult(ok=False, error=why))


class Controller:
    """State of the controller: index, command channels, metrics."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.index = GlobalIndex()
        self.channels: dict[str, Channel] = {}
        self.metrics = Metrics()
        self.token = settings.token.get_secret_value().encode()

    # -- instances -----------------------------------------------------------------------------

    def state(self, instance_id: str) -> InstanceState:
        state = self.index.seen(instance_id)
        if state is None:
            raise HTTPException(404, f"unknown instance {instance_id!r} (not registered, or "
                                     "expired: register again)")
        return state

    def drop(self, instance_id: str, why: str) -> None:
        self.index.remove(instance_id)
        channel = self.channels.pop(instance_id, None)
        if channel is not None:
            channel.fail_all(why)

    def expire(self) -> None:
        for instance_id in self.index.expire(self.settings.expiry_s):
            self.metrics.inc("controller_instances_expired_total")
            channel = self.channels.pop(instance_id, None)
            if channel is not None:
                channel.fail_all("instance expired")

    # -- commands ------------------------------------------------------------------------------

    async def dispatch(self, instance_id: str, op: str, args: dict[str, Any]) -> m.InstanceResult:
        """Queue a command for an instance and wait for its result."""
        channel = self.channels.get(instance_id)
        if channel is None:
            return m.InstanceResult(instance=instance_id, ok=False, error="unknown instance")
        command = m.Command(id=uuid.uuid4().hex, op=op, args=args)
        future = asyncio.get_running_loop().create_future()
        channel.pending[command.id] = future
        channel.queue.append(command)
        channel.wakeup.set()
        self.metrics.inc("controller_commands_total", label=op)
        try:
            result = await asyncio.wait_for(future, self.settings.command_timeout_s)
        except TimeoutError:
            result = m.CommandResult(
                ok=False, error=f"no answer within {self.settings.command_timeout_s}s")
            if command in channel.queue:
                channel.queue.remove(command)
        finally:
            channel.pending.pop(command.id, None)
        if not result.ok:
            self.metrics.inc("controller_command_failures_total", label=op)
        return m.InstanceResult(instance=instance_id, ok=result.ok, result=result.result,
                                error=result.error)

    async def dispatch_many(self, ids: list[str], op: str,
                            args: dict[str, Any]) -> list[m.InstanceResult]:
        return list(await asyncio.gather(*(self.dispatch(i, op, args) for i in ids)))


class BodyLimit:
    """ASGI middleware: refuse request bodies over a size limit with 413, before reading them
    whole (by ``Content-Length``, and by counting for chunked bodies).

    The limit depends on the path and on whether the caller holds the token
    (``limit_for(path, authorized)``): the large limit of instance results is only for callers
    with the token, so nobody without it gets more than ``max_body_bytes`` parsed."""

    def __init__(self, app: Any, limit_for: Callable[[str, bool], int],
                 authorized: Callable[[bytes | None], bool]) -> None:
        self.app = app
        self.limit_for = limit_for
        self.authorized = authorized

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        limit = self.limit_for(scope["path"], self.authorized(headers.get(b"authorization")))
        length = headers.get(b"content-length")
        too_big = f"request body over the limit of {limit} bytes (KVCORE_CONTROLLER_MAX_BODY_BYTES)"
        if length is not None:
            if not length.isdigit():
                await JSONResponse({"detail": "bad Content-Length header"}, 400)(
                    scope, receive, send)
                return
            if int(length) > limit:
                await JSONResponse({"detail": too_big}, 413, headers={"Connection": "close"})(
                    scope, receive, send)
                return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_big)
            return message

        await self.app(scope, limited, send)


def create_app(settings: ControllerSettings) -> FastAPI:
    """The controller app; ``settings.token`` must be set."""
    ctl = Controller(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def reaper() -> None:
            while True:
                await asyncio.sleep(min(1.0, settings.expiry_s / 4))
                ctl.expire()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="kvcore controller", version=kvcore.__version__, lifespan=lifespan,
                  description="See and steer the KV cache of every kvcore instance.",
                  default_response_class=SafeJSONResponse,
                  docs_url=docs_assets.docs_url())
    docs_assets.install_docs(app)  # /docs from local Swagger UI files: it works offline
    app.state.controller = ctl
    bearer = HTTPBearer(auto_error=False, description="KVCORE_CONTROLLER_TOKEN")

    def authorize(credentials: HTTPAuthorizationCredentials | None) -> None:
        if credentials is None:
            ctl.metrics.inc("controller_auth_failures_total", label="missing")
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>' "
                                     "with the value of KVCORE_CONTROLLER_TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), ctl.token):
            ctl.metrics.inc("controller_auth_failures_total", label="wrong")
            raise HTTPException(403, "wrong bearer token")

    def mutating(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        authorize(credentials)

    def reading(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.auth_reads:
            authorize(credentials)

    # -- limits and errors ---------------------------------------------------------------------

    def body_limit(path: str, authorized: bool) -> int:
        if authorized and path.endswith("/result"):
            return settings.max_transfer_bytes * 4 // 3 + (1 << 20)
        return settings.max_body_bytes

    def holds_token(header: bytes | None) -> bool:
        if not header or not header[:7].lower() == b"bearer ":
            return False
        return hmac.compare_digest(header[7:].strip(), ctl.token)

    app.add_middleware(BodyLimit, limit_for=body_limit, authorized=holds_token)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _printable(jsonable_encoder(exc.errors()))
        parts = []
        for error in errors[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return SafeJSONResponse(
            {"detail": errors, "message": "invalid request: " + "; ".join(parts)},
            status_code=422)

    def tenant_of(req: m.PrefixRequest) -> str:
        return req.tenant_of()

    def answered_keys(result: dict[str, Any], who: str) -> list[str]:
        """The chunk keys an instance's answer names; 409 when they are not well-formed."""
        keys = result.get("keys", [])
        if not isinstance(keys, list) or not all(
                isinstance(k, str) and _KEY_HEX.fullmatch(k) for k in keys):
            raise HTTPException(409, f"{who}: malformed answer (keys must be a list of "
                                     f"{2 * KEY_BYTES}-hex-digit chunk keys)")
        return keys

    def check_tokens(tokens: list[int]) -> None:
        if len(tokens) > settings.max_tokens:
            raise HTTPException(413, f"{len(tokens)} tokens is over the limit of "
                                     f"{settings.max_tokens} (KVCORE_CONTROLLER_MAX_TOKENS)")

    def known(instance_id: str, tier: str | None = None) -> InstanceState:
        state = ctl.index.instances.get(instance_id)
        if state is None:
            raise HTTPException(404, f"unknown instance {instance_id!r}")
        if tier is not None and tier not in state.tiers:
            raise HTTPException(404, f"instance {instance_id!r} has no tier {tier!r}; "
                                     f"its tiers: {', '.join(state.tiers)}")
        return state

    # -- reading -------------------------------------------------------------------------------

    @app.get("/v1/health", response_model=m.HealthResponse, tags=["read"])
    async def health() -> m.HealthResponse:
        """Liveness of the controller."""
        return m.HealthResponse(status="ok", version=kvcore.__version__,
                                instances=len(ctl.index.instances))

    @app.get("/v1/instances", response_model=m.InstancesResponse, tags=["read"],
             dependencies=[Depends(reading)], responses=ERRORS)
    async def instances() -> m.InstancesResponse:
        """Registered instances, their tiers with usage, and what the index holds of each."""
        now_wall, now = time.time(), time.monotonic()
        out = []
        for s in ctl.index.instances.values():
            usage = s.stats.get("tiers", {})
            tiers = {t: m.TierUsageModel(**{k: v for k, v in usage.get(t, {}).items()
                                            if k in m.TierUsageModel.model_fields})
                     for t in s.tiers}
            out.append(m.InstanceInfo(
                id=s.id, name=s.name, host=s.host, pid=s.pid, chunk_size=s.chunk_size,
                tiers=tiers, chunks_indexed={t: len(k) for t, k in s.held.items()},
                registered_at=s.registered_at, last_seen=now_wall - (now - s.last_seen),
                role=s.role, cache_server=s.cache_server,
                attached=ctl.index.attached(s) if s.role == "cache-server" else [],
                clients=s.stats.get("clients", [])))
        return m.InstancesResponse(instances=out)

    def target_of(req: m.RouteRequest) -> bytes | ServedModel:
        if req.model is not None:
            return ServedModel(req.model, req.rank)
        assert req.namespace is not None  # the model validator asks for one of the two
        return m.namespace_digest(req.namespace)

    @app.post("/v1/lookup", response_model=m.LookupResponse, tags=["read"],
              dependencies=[Depends(reading)], responses=ERRORS)
    async def lookup(req: m.RouteRequest) -> m.LookupResponse:
        """How many leading tokens of a prompt each instance holds, in any tier and per tier.

        By ``model`` (a served model name), only the instances serving it answer, each under
        its own namespace for it."""
        check_tokens(req.tokens)
        rows = ctl.index.lookup(target_of(req), req.tokens, tenant_of(req))
        ctl.metrics.inc("controller_lookups_total")
        return m.LookupResponse(prompt_tokens=len(req.tokens), instances=[
            m.InstanceHolding(instance=s.id, name=s.name, namespace=digest.hex(), tokens=n,
                              by_tier=by_tier)
            for s, digest, n, by_tier in rows])

    @app.post("/v1/route", response_model=m.RouteResponse, tags=["read"],
              dependencies=[Depends(reading)], responses=ERRORS)
    async def route(req: m.RouteRequest) -> m.RouteResponse:
        """The instance with the longest cached prefix of the prompt (cache-aware routing).

        By ``model``, among the instances serving that model name."""
        check_tokens(req.tokens)
        best = ctl.index.route(target_of(req), req.tokens, tenant_of(req))
        ctl.metrics.inc("controller_routes_total")
        if best is None:
            return m.RouteResponse(instance=None)
        state, digest, tokens = best
        return m.RouteResponse(instance=state.id, name=state.name, tokens=tokens,
                               namespace=digest.hex())

    @app.get("/v1/namespaces", response_model=m.NamespacesResponse, tags=["read"],
             dependencies=[Depends(reading)], responses=ERRORS)
    async def namespaces(model: str | None = Query(None, max_length=256),
                         tenant: str | None = Query(None, max_length=256)
                         ) -> m.NamespacesResponse:
        """Every namespace the instances reported or hold chunks under, with its human parts
        (served model names, tenant, layout...) and the chunks each instance indexes of it
        per tier; ``model`` and ``tenant`` narrow the list."""
        return m.NamespacesResponse(namespaces=namespace_listing(ctl.index, model, tenant))

    async def gather_records(ids: list[str], args: dict[str, Any]) -> m.RequestsResponse:
        records: list[m.RequestRecordModel] = []
        unanswered: list[m.InstanceResult] = []
        for answer in await ctl.dispatch_many(ids, "requests", args):
            if not answer.ok:
                unanswered.append(answer)
                continue
            found = answer.result.get("records", [])
            for raw in found if isinstance(found, list) else []:
                try:
                    records.append(m.RequestRecordModel.model_validate(
                        {**raw, "instance": answer.instance}))
                except (ValidationError, TypeError):
                    unanswered.append(m.InstanceResult(instance=answer.instance, ok=False,
                                                       error="malformed request record"))
        records.sort(key=lambda r: r.at, reverse=True)
        return m.RequestsResponse(records=records, unanswered=unanswered)

    @app.get("/v1/requests/{request_id}", response_model=m.RequestsResponse, tags=["read"],
             dependencies=[Depends(reading)], responses={**ERRORS, **NOT_FOUND})
    async def request_record(request_id: str) -> m.RequestsResponse:
        """What each instance saw of one request (the engine's request id): tokens asked,
        tokens hit by tier, and why the first missing chunk missed (docs/misses.md)."""
        if len(request_id) > 1024:
            raise HTTPException(404, "no request with that id (ids are at most 1024 characters)")
        found = await gather_records(list(ctl.index.instances), {"id": request_id})
        if not found.records:
            asked = len(ctl.index.instances) - len(found.unanswered)
            raise HTTPException(404, f"no instance remembers request {request_id!r} ({asked} "
                                     "asked; each keeps its last KVCORE_REQUEST_LOG_SIZE)")
        return found

    @app.get("/v1/requests", response_model=m.RequestsResponse, tags=["read"],
             dependencies=[Depends(reading)], responses={**ERRORS, **NOT_FOUND})
    async def recent_requests(limit: int = Query(20, ge=1, le=1000),
                              instance: str | None = None) -> m.RequestsResponse:
        """The newest request records of every instance (or of one), newest first."""
        ids = [known(instance).id] if instance is not None else list(ctl.index.instances)
        found = await gather_records(ids, {"limit": limit})
        found.records = found.records[:limit]
        return found

    @app.get("/metrics", response_class=PlainTextResponse, tags=["read"],
             dependencies=[Depends(reading)], responses=ERRORS)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics of the controller and of every instance (label ``instance``)."""
        families = Families()
        families.add("controller_instances", "gauge", len(ctl.index.instances), {})
        snap = ctl.metrics.snapshot()
        for name, by_label in sorted(snap["counters"].items()):
            label_name = CONTROLLER_LABELS.get(name, "label")
            for label, value in sorted(by_label.items()):
                families.add(name, "counter", value, {label_name: label} if label else {})
        for s in ctl.index.instances.values():
            for tier, keys in s.held.items():
                families.add("controller_chunks_indexed", "gauge", len(keys),
                             {"instance": s.id, "tier": tier})
        for s in ctl.index.instances.values():
            families.add_stats(s.stats, {"instance": s.id, "name": s.name})
        return PlainTextResponse(families.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/metrics", tags=["read"], dependencies=[Depends(reading)], responses=ERRORS)
    async def metrics_json() -> dict[str, Any]:
        """The same metrics as JSON: the controller's counters and each instance's stats."""
        return {"controller": ctl.metrics.snapshot(),
                "instances": {s.id: s.stats for s in ctl.index.instances.values()}}

    # -- mutations -----------------------------------------------------------------------------

    @app.post("/v1/clear", response_model=m.MutationResponse, tags=["mutate"],
              dependencies=[Depends(mutating)], responses={**ERRORS, **NOT_FOUND})
    async def clear(req: m.ClearRequest) -> m.MutationResponse:
        """Remove chunks, narrowed by namespace, instance and tier."""
        if req.instance is not None:
            known(req.instance, req.tier)
            ids = [req.instance]
        else:
            ids = [i for i, s in ctl.index.instances.items()
                   if req.tier is None or req.tier in s.tiers]
        ns = m.namespace_digest(req.namespace) if req.namespace is not None else None
        results = await ctl.dispatch_many(ids, "clear", {
            "namespace": ns.hex() if ns else None, "tier": req.tier})
        for r in results:
            if r.ok:
                ctl.index.forget(r.instance, ns, req.tier)
        return m.MutationResponse(results=results)

    async def pin_op(req: m.PinRequest, op: str) -> m.MutationResponse:
        check_tokens(req.tokens)
        if req.instance is not None:
            known(req.instance)
        ids = [req.instance] if req.instance else list(ctl.index.instances)
        ns = m.namespace_digest(req.namespace)
        return m.MutationResponse(results=await ctl.dispatch_many(
            ids, op, {"namespace": ns.hex(), "tokens": req.tokens, "tenant": tenant_of(req)}))

    @app.post("/v1/pin", response_model=m.MutationResponse, tags=["mutate"],
              dependencies=[Depends(mutating)], responses={**ERRORS, **NOT_FOUND})
    async def pin(req: m.PinRequest) -> m.MutationResponse:
        """Keep the cached chunks of a prefix through eviction (result: chunks pinned)."""
        return await pin_op(req, "pin")

    @app.post("/v1/unpin", response_model=m.MutationResponse, tags=["mutate"],
              dependencies=[Depends(mutating)], responses={**ERRORS, **NOT_FOUND})
    async def unpin(req: m.PinRequest) -> m.MutationResponse:
        """Make a pinned prefix evictable again."""
        return await pin_op(req, "unpin")

    @app.post("/v1/move", response_model=m.MoveResponse, tags=["mutate"],
              dependencies=[Depends(mutating)],
              responses={**ERRORS, **NOT_FOUND, **CONFLICT})
    async def move(req: m.MoveRequest) -> m.MoveResponse:
        """Copy or move the cached leading chunks of a prefix to another tier or instance."""
        check_tokens(req.tokens)
        src = known(req.source.instance, req.source.tier)
        dst = known(req.target.instance, req.target.tier)
        if (src.id, req.source.tier) == (dst.id, req.target.tier):
            raise HTTPException(409, "source and target are the same place")
        if src.chunk_size != dst.chunk_size:
            raise HTTPException(409, f"chunk sizes differ ({src.chunk_size} at {src.id}, "
                                     f"{dst.chunk_size} at {dst.id})")
        ns = m.namespace_digest(req.namespace).hex()
        tenant = tenant_of(req)
        delete = req.mode == "move"
        if src.id == dst.id:
            r = await ctl.dispatch(src.id, "copy_tiers", {
                "namespace": ns, "tokens": req.tokens, "tenant": tenant,
                "source_tier": req.source.tier,
                "target_tier": req.target.tier, "delete_source": delete})
            if not r.ok:
                raise HTTPException(409, f"instance {src.id}: {r.error}")
            keys = answered_keys(r.result, f"instance {src.id}")
        else:
            exported = await ctl.dispatch(src.id, "export", {
                "namespace": ns, "tokens": req.tokens, "tenant": tenant, "tier": req.source.tier,
                "max_bytes": settings.max_transfer_bytes})
            if not exported.ok:
                raise HTTPException(409, f"source {src.id}: {exported.error}")
            keys = answered_keys(exported.result, f"source {src.id}")
            chunks = exported.result.get("chunks", [])
            if not isinstance(chunks, list) or len(chunks) != len(keys) or not all(
                    isinstance(c, str) for c in chunks):
                raise HTTPException(409, f"source {src.id}: malformed export answer (chunks)")
            imported = await ctl.dispatch(dst.id, "import", {
                "keys": keys, "chunks": chunks,
                "tier": req.target.tier})
            if not imported.ok:
                raise HTTPException(409, f"target {dst.id}: {imported.error}")
            if delete and keys:
                removed = await ctl.dispatch(src.id, "delete",
                                             {"keys": keys, "tier": req.source.tier})
                if not removed.ok:
                    raise HTTPException(409, f"copied, but source {src.id} kept the chunks: "
                                             f"{removed.error}")
        raw = [bytes.fromhex(k) for k in keys]
        ctl.index.apply(dst.id, req.target.tier, "admit", raw)
        if delete:
            ctl.index.apply(src.id, req.source.tier, "evict", raw)
        return m.MoveResponse(chunks=len(keys), tokens=len(keys) * src.chunk_size,
                              mode=req.mode)

    # -- instance side -------------------------------------------------------------------------

    @app.post("/v1/instances", response_model=m.RegisterResponse, tags=["instance"],
              dependencies=[Depends(mutating)], responses=ERRORS)
    async def register(req: m.RegisterRequest) -> m.RegisterResponse:
        """An instance registers (again); ``reset`` empties its part of the index."""
        ctl.index.register(InstanceState(id=req.id, name=req.name or req.id,
                                         chunk_size=req.chunk_size, tiers=list(req.tiers),
                                         pid=req.pid, host=req.host, role=req.role,
                                         cache_server=req.cache_server), req.reset)
        ctl.channels.setdefault(req.id, Channel())
        ctl.metrics.inc("controller_registrations_total")
        return m.RegisterResponse(id=req.id, heartbeat_s=settings.heartbeat_s,
                                  expiry_s=settings.expiry_s)

    @app.delete("/v1/instances/{instance_id}", response_model=m.OkResponse, tags=["instance"],
                dependencies=[Depends(mutating)], responses={**ERRORS, **NOT_FOUND})
    async def deregister(instance_id: str) -> m.OkResponse:
        """An instance leaves; its chunks leave the index."""
        known(instance_id)
        ctl.drop(instance_id, "instance left")
        return m.OkResponse()

    @app.post("/v1/instances/{instance_id}/heartbeat", response_model=m.OkResponse,
              tags=["instance"], dependencies=[Depends(mutating)],
              responses={**ERRORS, **NOT_FOUND})
    async def heartbeat(instance_id: str, req: m.HeartbeatRequest) -> m.OkResponse:
        """Liveness plus the instance's stats (tier usage and metrics)."""
        state = ctl.state(instance_id)
        state.stats = req.stats.model_dump(exclude_defaults=False)
        if req.namespaces is not None:
            state.namespaces = reported_namespaces(req.namespaces)
        return m.OkResponse()

    @app.post("/v1/instances/{instance_id}/events", response_model=m.OkResponse,
              tags=["instance"], dependencies=[Depends(mutating)],
              responses={**ERRORS, **NOT_FOUND})
    async def events(instance_id: str, req: m.EventsRequest) -> m.OkResponse:
        """Chunks the instance admitted or evicted, in order."""
        ctl.state(instance_id)
        for event in req.events:
            ctl.index.apply(instance_id, event.tier, event.kind,
                            [bytes.fromhex(k) for k in event.keys])
            ctl.metrics.inc("controller_events_total", len(event.keys), event.kind)
        return m.OkResponse()

    @app.get("/v1/instances/{instance_id}/commands", response_model=m.CommandsResponse,
             tags=["instance"], dependencies=[Depends(mutating)],
             responses={**ERRORS, **NOT_FOUND})
    async def commands(instance_id: str,
                       wait: float = Query(0.0, ge=0.0, le=60.0)) -> m.CommandsResponse:
        """Long-poll: commands for the instance, waiting up to ``wait`` seconds for one."""
        ctl.state(instance_id)
        channel = ctl.channels.setdefault(instance_id, Channel())
        wait = min(wait, settings.poll_s)
        if not channel.queue and wait > 0:
            channel.wakeup.clear()
            try:
                await asyncio.wait_for(channel.wakeup.wait(), wait)
            except TimeoutError:
                pass
        out = list(channel.queue)
        channel.queue.clear()
        return m.CommandsResponse(commands=out)

    @app.post("/v1/instances/{instance_id}/commands/{command_id}/result",
              response_model=m.OkResponse, tags=["instance"], dependencies=[Depends(mutating)],
              responses={**ERRORS, **NOT_FOUND})
    async def command_result(instance_id: str, command_id: str,
                             req: m.CommandResult) -> m.OkResponse:
        """The outcome of a command (late answers are ignored)."""
        ctl.state(instance_id)
        channel = ctl.channels.get(instance_id)
        future = channel.pending.get(command_id) if channel else None
        if future is not None and not future.done():
            future.set_result(req)
        return m.OkResponse()

    return app
