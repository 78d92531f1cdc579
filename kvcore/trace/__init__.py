"""Request traces with prefix-block hashes (Mooncake format): load, truncate, replay, bound."""

from kvcore.trace.format import Request, TraceError, load_trace, parse_trace

__all__ = ["Request", "TraceError", "load_trace", "parse_trace"]
