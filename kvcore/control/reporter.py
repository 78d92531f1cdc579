"""The instance side: report a :class:`~kvcore.engine.CacheEngine` to the controller and run
the commands it sends.

Two daemon threads, so the engine never waits on the network:

- *sender*: registers (with a full snapshot of the keys held), then every ``flush_s`` posts the
  admissions and evictions queued by the engine's observer, and a heartbeat with
  ``engine.stats()`` every ``heartbeat_s``. When the controller is away it drops what is
  queued, and registers again (with a fresh snapshot) when the controller answers.
- *commands*: long-polls ``GET /v1/instances/{id}/commands`` and runs what comes back
  (:mod:`kvcore.control.commands`), posting each result.

The engine's observer only appends to a bounded queue (never blocks); when the queue is full
the event is dropped and the next flush resynchronizes with a snapshot.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import queue
import socket
import threading
import time
from typing import Any

from pydantic import ValidationError

from kvcore.control.client import ControllerUnavailable, HttpJson
from kvcore.control.commands import run_command
from kvcore.control.models import MAX_REPORTED_NAMESPACES, NamespaceReport
from kvcore.control.settings import ControllerSettings
from kvcore.engine import CacheEngine
from kvcore.interfaces import Attachment
from kvcore.keys import ChunkKey
from kvcore.namespaces import NamespaceEntry

log = logging.getLogger("kvcore.control")
_counter = itertools.count()


class NotRegistered(Exception):
    """The controller does not know this instance (it restarted, or expired us)."""


def default_instance_id() -> str:
    n = next(_counter)
    base = f"{socket.gethostname()}-{os.getpid()}"
    return base if n == 0 else f"{base}-{n}"


def json_safe_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without the ``+Inf`` histogram buckets (not valid JSON; equal to ``count``)."""
    histograms = {
        name: {label: {**hist, "buckets": [b for b in hist.get("buckets", [])
                                           if math.isfinite(b[0])]}
               for label, hist in by_label.items()}
        for name, by_label in stats.get("histograms", {}).items()}
    return {**stats, "histograms": histograms}


def reportable_namespaces(entries: list[NamespaceEntry]) -> list[dict[str, Any]]:
    """The entries as heartbeat reports, leaving out any the controller would refuse (a field
    over its length limit, such as a very long tenant salt): they stay unlisted, nothing else."""
    out = []
    for entry in entries[:MAX_REPORTED_NAMESPACES]:
        report = entry.as_report()
        try:
            NamespaceReport.model_validate(report)
        except ValidationError as exc:
            log.debug("kvcore reporter: namespace %s not reported: %s",
                      entry.namespace.digest.hex(), exc)
            continue
        out.append(report)
    return out


class TokenRefused(Exception):
    """The controller answered 401 or 403: this instance's token is wrong or missing."""


class Reporter(Attachment):
    """Reports one engine to the controller at ``settings.url``. Call :meth:`close` to stop."""

    def __init__(self, engine: CacheEngine, settings: ControllerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.instance_id = settings.instance_id or default_instance_id()
        self.name = settings.instance_name or self.instance_id
        self.http = HttpJson(settings.url, settings.token.get_secret_value(), settings.timeout_s)
        self._events: queue.Queue[tuple[str, str, list[ChunkKey]]] = queue.Queue(
            settings.queue_size)
        self._resync = threading.Event()
        self._resync.set()
        self._namespaces_sent: int | None = None
        """The namespace book's version the controller has (None: send them)."""
        self._cache_server = ""
        """The cache server this engine was registered behind (it may attach later)."""
        self._registered = threading.Event()
        self._stop = threading.Event()
        self.dropped_events = 0
        self._warned: set[str] = set()
        self._threads = [
            threading.Thread(target=self._send_loop, name="kvcore-report", daemon=True),
            threading.Thread(target=self._command_loop, name="kvcore-commands", daemon=True),
        ]

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    def start(self) -> Reporter:
        """Start the threads; the reporter also closes (deregisters) at interpreter exit."""
        self.engine.subscribe(self._on_event)
        for thread in self._threads:
            thread.start()
        atexit.register(self.close)
        return self

    # -- engine side (must never block) ---------------------------------------------------------

    def _on_event(self, tier: str, kind: str, keys: list[ChunkKey]) -> None:
        if self._stop.is_set():
            return
        try:
            self._events.put_nowait((tier, kind, list(keys)))
        except queue.Full:
            self.dropped_events += 1
            self._resync.set()

    # -- sender --------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        next_beat = 0.0
        backoff = self.settings.flush_s
        while not self._stop.is_set():
            if self._engine_closed():
                self.close()
                return
            try:
                if self._resync.is_set():
                    self._register()
                    next_beat = 0.0
                self._send_events()
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + self.settings.heartbeat_s
                backoff = self.settings.flush_s
                wait = self.settings.flush_s
            except NotRegistered:
                self._lost("the controller forgot this instance")
                wait = 0.0
            except TokenRefused as exc:
                self._unreachable("token", f"the controller refused KVCORE_CONTROLLER_TOKEN "
                                  f"({exc}): give this instance the controller's token")
                backoff = wait = self.settings.heartbeat_s
            except ControllerUnavailable as exc:
                self._unreachable("unavailable", f"no answer from KVCORE_CONTROLLER_URL "
                                  f"({exc})")
                backoff = min(backoff * 2, self.settings.heartbeat_s)
                wait = backoff
            except Exception as exc:  # never let the thread die
                log.warning("kvcore reporter: %s: %s", type(exc).__name__, exc)
                self._lost(str(exc))
                wait = self.settings.heartbeat_s
            self._stop.wait(wait)

    def _engine_closed(self) -> bool:
        return self.engine.closed

    def _unreachable(self, kind: str, why: str) -> None:
        """Lost (logged) once registered; before that, one warning per kind of failure, so a
        wrong URL or token is said once, not at every retry."""
        if not self._registered.is_set() and kind not in self._warned:
            self._warned.add(kind)
            log.warning("kvcore reporter: cannot register at %s: %s; the engine serves without "
                        "the controller and retries", self.settings.url, why)
        self._lost(why)

    def _lost(self, why: str) -> None:
        if self._registered.is_set():
            log.warning("kvcore reporter: lost the controller at %s (%s); the engine keeps "
                        "serving, events are dropped until it answers", self.settings.url, why)
        self._registered.clear()
        self._resync.set()
        self._drain()

    def _drain(self) -> list[tuple[str, str, list[ChunkKey]]]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def _post(self, path: str, body: Any, method: str = "POST") -> Any:
        status, payload = self.http.call(method, path, body)
        if status == 404:
            raise NotRegistered()
        if status in (401, 403):
            raise TokenRefused(f"{path}: HTTP {status}")
        if status >= 400:
            raise ControllerUnavailable(f"{path}: HTTP {status}: {payload}")
        return payload

    def _register(self) -> None:
        self._resync.clear()
        self._namespaces_sent = None
        self._drain()  # the snapshot below covers everything queued so far
        self._cache_server = self._server_id()
        self._post("/v1/instances", {
            "id": self.instance_id, "name": self.name, "chunk_size": self.engine.chunk_size,
            "tiers": [t.name for t in self.engine.tiers], "pid": os.getpid(),
            "host": socket.gethostname(), "reset": True, "role": self.engine.role,
            "cache_server": self._cache_server})
        for tier in self.engine.tiers:
            if not tier.reported:
                continue  # its owner (the cache server) reports it
            try:
                keys = list(tier.iter_keys())
            except Exception as exc:
                log.warning("kvcore reporter: cannot list tier %s: %s", tier.name, exc)
                continue
            for start in range(0, len(keys), self.settings.batch_keys):
                batch = keys[start : start + self.settings.batch_keys]
                self._post(f"/v1/instances/{self.instance_id}/events", {"events": [
                    {"tier": tier.name, "kind": "admit", "keys": [k.hex() for k in batch]}]})
        self._registered.set()
        log.info("kvcore reporter: registered as %s at %s", self.instance_id, self.settings.url)

    def _send_events(self) -> None:
        batch: list[dict[str, Any]] = []
        count = 0
        while count < self.settings.batch_keys:
            try:
                tier, kind, keys = self._events.get_nowait()
            except queue.Empty:
                break
            hexes = [k.hex() for k in keys]
            if batch and batch[-1]["tier"] == tier and batch[-1]["kind"] == kind:
                batch[-1]["keys"].extend(hexes)
            else:
                batch.append({"tier": tier, "kind": kind, "keys": hexes})
            count += len(keys)
        if batch:
            self._post(f"/v1/instances/{self.instance_id}/events", {"events": batch})

    def _server_id(self) -> str:
        """The instance id of the cache server this engine's memory tier belongs to, if any."""
        return str(getattr(self.engine.memory, "server_instance", ""))

    def _heartbeat(self) -> None:
        if self._server_id() != self._cache_server:
            self._resync.set()  # attached to (another) cache server: register anew
            return
        body: dict[str, Any] = {"stats": json_safe_stats(self.engine.stats())}
        book = self.engine.namespaces
        version = book.version
        if version != self._namespaces_sent:
            body["namespaces"] = reportable_namespaces(book.entries())
        self._post(f"/v1/instances/{self.instance_id}/heartbeat", body)
        self._namespaces_sent = version

    # -- commands ------------------------------------------------------------------------------

    def _command_loop(self) -> None:
        poll = self.settings.poll_s
        while not self._stop.is_set():
            if not self._registered.wait(0.2):
                continue
            try:
                status, payload = self.http.call(
                    "GET", f"/v1/instances/{self.instance_id}/commands?wait={poll}",
                    timeout_s=poll + self.settings.timeout_s)
            except ControllerUnavailable:
                self._stop.wait(self.settings.flush_s)
                continue
            if status != 200:
                if status == 404:
                    self._resync.set()
                self._stop.wait(self.settings.flush_s)
                continue
            for command in payload.get("commands", []):
                self._run(command)

    def _run(self, command: dict[str, Any]) -> None:
        try:
            body = {"ok": True, "result": run_command(self.engine, command["op"],
                                                      command.get("args", {}))}
        except Exception as exc:
            body = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        try:
            self.http.call("POST", f"/v1/instances/{self.instance_id}/commands/"
                                   f"{command['id']}/result", body)
        except ControllerUnavailable as exc:
            log.warning("kvcore reporter: could not report a command result: %s", exc)

    # -- shutdown ------------------------------------------------------------------------------

    def close(self, deregister: bool = True) -> None:
        """Stop reporting; tell the controller this instance left (best effort, bounded).

        Also happens by itself soon after the engine is closed.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(timeout=0.5)
        if deregister and self._registered.is_set():
            try:
                self.http.call("DELETE", f"/v1/instances/{self.instance_id}",
                               timeout_s=min(1.0, self.settings.timeout_s))
            except ControllerUnavailable:
                pass
        self._registered.clear()
