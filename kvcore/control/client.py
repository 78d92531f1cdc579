"""Talking to the controller over HTTP with the standard library only (no extra dependency in
engine processes): :class:`HttpJson` for the instance side, :class:`ControllerClient` for users."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from kvcore.keys import Namespace


class ControllerUnavailable(ConnectionError):
    """The controller did not answer (refused, timed out, or an HTTP 5xx)."""


class ControllerError(RuntimeError):
    """The controller refused a request (4xx); ``status`` and the message say why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class HttpJson:
    """JSON over HTTP with a bearer token and a bounded timeout on every call."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: Any = None,
             timeout_s: float | None = None) -> tuple[int, Any]:
        """``(status, parsed body)``; raises :class:`ControllerUnavailable` when unreachable."""
        data = json.dumps(body, allow_nan=False).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                return response.status, _parse(response.read(), response.headers)
        except urllib.error.HTTPError as exc:
            payload = _parse(exc.read(), exc.headers)
            if exc.code >= 500:
                raise ControllerUnavailable(f"{method} {path}: HTTP {exc.code}") from None
            return exc.code, payload
        except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad reply
            raise ControllerUnavailable(f"{method} {path}: {exc}") from None


def _parse(raw: bytes, headers: Any) -> Any:
    if "json" in (headers.get("Content-Type") or ""):
        return json.loads(raw or b"null")
    return raw.decode(errors="replace")


def namespace_arg(namespace: Namespace | bytes | str) -> Any:
    """A namespace as the API takes it: its fields, or its 16-hex-digit id."""
    if isinstance(namespace, Namespace):
        from dataclasses import asdict

        return asdict(namespace)
    if isinstance(namespace, bytes):
        return namespace.hex()
    return namespace


def _prefix(namespace: Namespace | bytes | str | None, tokens: Sequence[int],
            model: str | None, tenant: str | None) -> dict[str, Any]:
    """The body of a lookup or route: a namespace, or a served model name (and tenant)."""
    body: dict[str, Any] = {"tokens": list(tokens)}
    if namespace is not None:
        body["namespace"] = namespace_arg(namespace)
    if model is not None:
        body["model"] = model
    if tenant is not None:
        body["tenant"] = tenant
    return body


class ControllerClient:
    """The control API from Python.

    >>> client = ControllerClient("http://127.0.0.1:8470", token="...")
    >>> client.route(None, tokens, model="llama-3-8b")["instance"]
    """

    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0) -> None:
        self.http = HttpJson(url, token, timeout_s)

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.http.call(method, path, body)
        if status >= 400:
            detail = ((payload.get("message") or payload.get("detail"))
                      if isinstance(payload, dict) else payload)
            raise ControllerError(status, str(detail))
        return payload

    def health(self) -> dict[str, Any]:
        return self._ok("GET", "/v1/health")

    def instances(self) -> list[dict[str, Any]]:
        """Registered instances with tier usage and indexed chunk counts."""
        return self._ok("GET", "/v1/instances")["instances"]

    def lookup(self, namespace: Namespace | bytes | str | None, tokens: Sequence[int], *,
               model: str | None = None, tenant: str | None = None) -> dict[str, int]:
        """Leading cached tokens of a prompt by instance id (any tier)."""
        rows = self.lookup_detail(namespace, tokens, model=model, tenant=tenant)
        return {row["instance"]: row["tokens"] for row in rows}

    def lookup_detail(self, namespace: Namespace | bytes | str | None, tokens: Sequence[int],
                      *, model: str | None = None,
                      tenant: str | None = None) -> list[dict[str, Any]]:
        """Per instance: leading cached tokens in any tier and in each tier, and the
        namespace counted."""
        return self._ok("POST", "/v1/lookup", _prefix(namespace, tokens, model, tenant))[
            "instances"]

    def route(self, namespace: Namespace | bytes | str | None, tokens: Sequence[int], *,
              model: str | None = None, tenant: str | None = None) -> dict[str, Any]:
        """``{"instance", "name", "tokens", "namespace"}`` of the instance with the longest
        cached prefix; by ``model`` (a served model name, ``namespace=None``), among the
        instances serving it."""
        return self._ok("POST", "/v1/route", _prefix(namespace, tokens, model, tenant))

    def namespaces(self, model: str | None = None,
                   tenant: str | None = None) -> list[dict[str, Any]]:
        """Namespaces with their served model names, tenant and holders (docs/controller.md)."""
        query = "&".join(f"{name}={quote(value, safe='')}" for name, value in
                         (("model", model), ("tenant", tenant)) if value is not None)
        return self._ok("GET", "/v1/namespaces" + (f"?{query}" if query else ""))[
            "namespaces"]

    def clear(self, namespace: Namespace | bytes | str | None = None,
              instance: str | None = None, tier: str | None = None) -> list[dict[str, Any]]:
        body = {"namespace": namespace_arg(namespace) if namespace is not None else None,
                "instance": instance, "tier": tier}
        return self._ok("POST", "/v1/clear", body)["results"]

    def pin(self, namespace: Namespace | bytes | str, tokens: Sequence[int],
            instance: str | None = None) -> list[dict[str, Any]]:
        body = {"namespace": namespace_arg(namespace), "tokens": list(tokens),
                "instance": instance}
        return self._ok("POST", "/v1/pin", body)["results"]

    def unpin(self, namespace: Namespace | bytes | str, tokens: Sequence[int],
              instance: str | None = None) -> list[dict[str, Any]]:
        body = {"namespace": namespace_arg(namespace), "tokens": list(tokens),
                "instance": instance}
        return self._ok("POST", "/v1/unpin", body)["results"]

    def move(self, namespace: Namespace | bytes | str, tokens: Sequence[int],
             source: tuple[str, str], target: tuple[str, str],
             mode: str = "copy") -> dict[str, Any]:
        """Copy (``mode="copy"``) or move a cached prefix; places are ``(instance, tier)``."""
        body = {"namespace": namespace_arg(namespace), "tokens": list(tokens), "mode": mode,
                "source": {"instance": source[0], "tier": source[1]},
                "target": {"instance": target[0], "tier": target[1]}}
        return self._ok("POST", "/v1/move", body)

    def request(self, request_id: str) -> list[dict[str, Any]]:
        """What each instance saw of one request, and why it missed (docs/misses.md)."""
        return self._ok("GET", f"/v1/requests/{quote(request_id, safe='')}")["records"]

    def requests(self, limit: int = 20, instance: str | None = None) -> list[dict[str, Any]]:
        """The newest request records, newest first."""
        query = f"?limit={int(limit)}" + (f"&instance={quote(instance)}" if instance else "")
        return self._ok("GET", f"/v1/requests{query}")["records"]

    def metrics_text(self) -> str:
        """The Prometheus exposition of the controller and every instance."""
        return self._ok("GET", "/metrics")

    def metrics(self) -> dict[str, Any]:
        return self._ok("GET", "/v1/metrics")
