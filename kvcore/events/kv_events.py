"""Built-in plugin: the ``kv_events`` attachment (published when ``KVCORE_KV_EVENTS_ENDPOINT``
is set) and its settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvcore.config import ConfigError, load_settings
from kvcore.events.settings import KVEventSettings
from kvcore.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvcore.engine import CacheEngine
    from kvcore.events.publisher import KVEventPublisher


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(KVEventSettings)


def start_publisher(engine: CacheEngine) -> KVEventPublisher | None:
    """The ``kv_events`` attachment: a publisher when ``KVCORE_KV_EVENTS_ENDPOINT`` is set."""
    settings = load_settings(KVEventSettings)
    if not settings.endpoint:
        return None
    try:
        import zmq  # noqa: F401 - pyzmq, named in the message below

        from kvcore.events.publisher import KVEventPublisher
    except ImportError as exc:
        raise ConfigError(f"KVCORE_KV_EVENTS_ENDPOINT is set but {exc.name} is not installed: "
                          "pip install 'kvcore[events]'") from None
    # An endpoint that cannot be bound (in use: another engine, or vLLM's other tensor-parallel
    # ranks) is logged and the engine runs without events (kvcore.attachments).
    return KVEventPublisher(engine, settings)


@hookimpl
def kvcore_register_attachments(register: Callable[..., None]) -> None:
    register("kv_events", start_publisher)
