"""KV events: what kvcore's tiers hold, published in vLLM's KV event format for cache-aware
routers (``KVCORE_KV_EVENTS_ENDPOINT``; docs/kv-events.md)."""
