"""Request and response bodies of the control API (pydantic): the OpenAPI description is
generated from these, and every request is validated against them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kvcore.keys import KEY_BYTES, NAMESPACE_BYTES, Namespace

Name = Annotated[str, StringConstraints(min_length=1, max_length=128,
                                        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")]
"""Instance ids and tier names: printable, no spaces, no slashes."""
KeyHex = Annotated[str, StringConstraints(pattern=rf"^[0-9a-f]{{{2 * KEY_BYTES}}}$")]
"""A chunk key as lowercase hex (48 characters)."""
NamespaceId = Annotated[str, StringConstraints(pattern=rf"^[0-9a-f]{{{2 * NAMESPACE_BYTES}}}$")]
"""A namespace digest as lowercase hex (16 characters)."""
TokenId = Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)]
"""A token id: an integer (``1.0`` or ``"1"`` are refused, never truncated)."""
MAX_TOKENS_DEFAULT = 262144
MAX_REPORTED_NAMESPACES = 512
"""Namespaces one heartbeat may report (an engine's book holds at most 320)."""


def has_surrogate(value: Any, depth: int = 0) -> bool:
    """Whether a decoded JSON value holds a lone surrogate (``"\\ud800"``) anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if depth > 64:
        return False
    if isinstance(value, dict):
        return any(has_surrogate(k, depth + 1) or has_surrogate(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v, depth + 1) for v in value)
    return False


class Strict(BaseModel):
    """A request body: unknown fields and strings that are not valid Unicode are refused."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if has_surrogate(data):
            raise ValueError("a string holds a lone surrogate (not valid Unicode)")
        return data


class NamespaceSpec(Strict):
    """The fields of :class:`kvcore.keys.Namespace`; the controller hashes them."""

    model: str = Field(min_length=1, max_length=512)
    dtype: str = Field("bfloat16", max_length=64)
    layout: str = Field("opaque", max_length=64)
    geometry: str = Field("", max_length=512)
    rank: int = Field(0, ge=0, le=65535)
    world_size: int = Field(1, ge=1, le=65536)
    tenant: str = Field("", max_length=256)

    def digest(self) -> bytes:
        return Namespace(**self.model_dump()).digest


def namespace_digest(value: NamespaceSpec | str) -> bytes:
    """8-byte digest of a namespace given as fields or as a hex id."""
    return value.digest() if isinstance(value, NamespaceSpec) else bytes.fromhex(value)


class PrefixRequest(Strict):
    """A prompt prefix: token ids under a namespace (fields or 16-hex-digit id)."""

    namespace: NamespaceSpec | NamespaceId
    tokens: list[TokenId] = Field(max_length=MAX_TOKENS_DEFAULT)
    tenant: str | None = Field(
        None, max_length=256,
        description="Tenant of a namespace given by id (its tenant salts the chunk hash); "
        "with namespace fields, their own tenant is used.")

    @model_validator(mode="after")
    def _one_tenant(self) -> PrefixRequest:
        if isinstance(self.namespace, NamespaceSpec) and self.tenant not in (
                None, self.namespace.tenant):
            raise ValueError("tenant differs from namespace.tenant")
        return self

    def tenant_of(self) -> str:
        """The tenant whose keys the request names (the chunk hash is salted with it)."""
        if isinstance(self.namespace, NamespaceSpec):
            return self.namespace.tenant
        return self.tenant or ""


ServedName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class RouteRequest(PrefixRequest):
    """A prompt prefix under a namespace, or under a served model name: each instance then
    answers with its own namespace for that name (model revision, geometry and layout as its
    engine declared them), for ``tenant``'s keys of parallel rank ``rank``."""

    namespace: NamespaceSpec | NamespaceId | None = None  # type: ignore[assignment]
    model: ServedName | None = Field(
        None, description="A served model name (vLLM's --served-model-name) or model path, "
        "instead of a namespace.")
    rank: int = Field(0, ge=0, le=65535,
                      description="With ``model``: the parallel rank whose chunks count.")

    @model_validator(mode="after")
    def _one_target(self) -> RouteRequest:
        if (self.namespace is None) == (self.model is None):
            raise ValueError("give exactly one of namespace and model")
        return self


class NamespaceReport(NamespaceSpec):
    """A namespace an instance knows, with the served names it answers to."""

    served_as: list[ServedName] = Field(default_factory=list, max_length=8)
    keyed_by: Literal["tokens", "engine"] = "tokens"


class NamespaceHolder(BaseModel):
    instance: str
    name: str
    chunks_by_tier: dict[str, int] = Field(description="Chunks of the namespace indexed per tier.")


class NamespaceInfo(BaseModel):
    """A namespace, its human parts, and the instances that know or hold it."""

    id: str = Field(description="The 16-hex-digit digest every chunk key starts with.")
    known: bool = Field(description="False for chunks held under a namespace no instance "
                        "reported (stored before a restart, or forgotten by its instance).")
    model: str = ""
    served_as: list[str] = Field(default_factory=list)
    tenant: str = ""
    dtype: str = ""
    layout: str = ""
    geometry: str = ""
    rank: int = 0
    world_size: int = 1
    keyed_by: str = ""
    instances: list[NamespaceHolder]


class NamespacesResponse(BaseModel):
    namespaces: list[NamespaceInfo]


class TierUsageModel(BaseModel):
    used_bytes: int = 0
    budget_bytes: int = 0
    chunks: int = 0


class RegisterRequest(Strict):
    """An instance announces itself; ``reset`` drops what the index held for it."""

    id: Name
    name: str = Field("", max_length=128)
    chunk_size: int = Field(gt=0, le=1 << 20)
    tiers: list[Name] = Field(min_length=1, max_length=16)
    pid: int = Field(0, ge=0)
    host: str = Field("", max_length=256)
    reset: bool = True
    role: Literal["engine", "cache-server"] = Field(
        "engine", description="An engine, or a host's kvcore server (docs/server.md).")
    cache_server: Name | Literal[""] = Field(
        "", description="The id of the cache server whose tiers this engine reads (empty: "
        "none): the engine is counted as holding what the server holds.")


class TierStats(BaseModel):
    used_bytes: int = Field(0, ge=0)
    budget_bytes: int = Field(0, ge=0)
    chunks: int = Field(0, ge=0)
    error: str = Field("", max_length=4096)


class HistogramStats(BaseModel):
    buckets: list[tuple[float, float]] = Field(default_factory=list, max_length=64)
    sum: float = 0.0
    count: float = 0.0


MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
Label = Annotated[str, StringConstraints(max_length=128)]


class ClientStats(BaseModel):
    """One engine process attached to a cache server."""

    pid: int = Field(0, ge=0)
    idle_s: float = Field(0.0, ge=0)
    reserved: int = Field(0, ge=0)
    holds: int = Field(0, ge=0)


class EngineStats(BaseModel):
    """The shape of ``CacheEngine.stats()``: tier usage, counters, histograms."""

    tiers: dict[Label, TierStats] = Field(default_factory=dict, max_length=64)
    counters: dict[MetricName, dict[Label, float]] = Field(default_factory=dict,
                                                           max_length=1024)
    histograms: dict[MetricName, dict[Label, HistogramStats]] = Field(default_factory=dict,
                                                                      max_length=256)
    clients: list[ClientStats] = Field(
        default_factory=list, max_length=4096,
        description="A cache server's attached engines (their processes).")


class HeartbeatRequest(Strict):
    """Liveness plus the instance's ``CacheEngine.stats()``, and its namespaces when they
    changed since the last heartbeat (``None``: unchanged)."""

    stats: EngineStats = Field(default_factory=EngineStats)
    namespaces: list[NamespaceReport] | None = Field(None, max_length=MAX_REPORTED_NAMESPACES)


class Event(Strict):
    tier: Name
    kind: Literal["admit", "evict"]
    keys: list[KeyHex] = Field(max_length=65536)


class EventsRequest(Strict):
    events: list[Event] = Field(max_length=4096)


class CommandResult(Strict):
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: str = Field("", max_length=4096)


class ClearRequest(Strict):
    """Clear chunks; every field narrows (none given clears everything everywhere)."""

    namespace: NamespaceSpec | NamespaceId | None = None
    instance: Name | None = None
    tier: Name | None = None


class PinRequest(PrefixRequest):
    """Pin (or unpin) the chunks of a prefix in one instance, or in every instance."""

    instance: Name | None = None


class Place(Strict):
    instance: Name
    tier: Name = "cpu"


class MoveRequest(PrefixRequest):
    """Copy (or move) the cached leading chunks of a prefix from one place to another."""

    source: Place
    target: Place
    mode: Literal["copy", "move"] = "copy"


class InstanceResult(BaseModel):
    instance: str
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: str = ""


class MutationResponse(BaseModel):
    results: list[InstanceResult]


class InstanceHolding(BaseModel):
    instance: str
    name: str
    namespace: str = Field("", description="The namespace id counted (with ``model``, the "
                           "instance's own for that name).")
    tokens: int = Field(description="Leading tokens cached in any tier of the instance.")
    by_tier: dict[str, int] = Field(description="Leading tokens cached in each tier.")


class LookupResponse(BaseModel):
    prompt_tokens: int
    instances: list[InstanceHolding]


class RouteResponse(BaseModel):
    instance: str | None = Field(description="Best instance, or null when none is registered "
                                 "(with ``model``: none serves that model).")
    name: str = ""
    tokens: int = 0
    namespace: str = ""


class InstanceInfo(BaseModel):
    id: str
    name: str
    host: str
    pid: int
    chunk_size: int
    tiers: dict[str, TierUsageModel]
    chunks_indexed: dict[str, int]
    registered_at: float
    last_seen: float
    role: str = Field("engine", description="engine, or cache-server (one per host).")
    cache_server: str = Field("", description="An engine's cache server: its instance id.")
    attached: list[str] = Field(
        default_factory=list, description="A cache server's engines that registered here.")
    clients: list[ClientStats] = Field(
        default_factory=list, description="A cache server's attached engine processes, "
        "registered here or not.")


class InstancesResponse(BaseModel):
    instances: list[InstanceInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    instances: int


class RegisterResponse(BaseModel):
    id: str
    heartbeat_s: float
    expiry_s: float


class Command(BaseModel):
    id: str
    op: str
    args: dict[str, Any]


class CommandsResponse(BaseModel):
    commands: list[Command]


class OkResponse(BaseModel):
    ok: bool = True


class MoveResponse(BaseModel):
    chunks: int = Field(description="Chunks copied (or moved).")
    tokens: int
    mode: Literal["copy", "move"]


class MissModel(BaseModel):
    """Why the first missing chunk missed: ``reason`` (see docs/misses.md) and its facts
    (``tier``, ``at``, ``policy``, ``differs``, ``cause``...)."""

    model_config = ConfigDict(extra="allow")
    reason: str = Field(max_length=64)
    chunk: int = Field(ge=0)


class LoadModel(BaseModel):
    from_chunk: int = Field(ge=0)
    chunks_asked: int = Field(ge=0)
    chunks_loaded: int = Field(ge=0)
    miss: MissModel | None = None


class RequestRecordModel(BaseModel):
    """What one instance saw of one request."""

    instance: str = ""
    id: str = Field(max_length=1024)
    at: float
    namespace: str = Field(max_length=2 * NAMESPACE_BYTES)
    tokens_asked: int = Field(ge=0)
    tokens_hit: int = Field(ge=0)
    hit_by_tier: dict[str, int] = Field(default_factory=dict)
    tokens_prompt: int | None = None
    miss: MissModel | None = None
    load: LoadModel | None = None


class RequestsResponse(BaseModel):
    records: list[RequestRecordModel]
    unanswered: list[InstanceResult] = Field(
        default_factory=list, description="Instances that could not be asked (no answer).")
