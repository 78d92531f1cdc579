"""Eviction policies. Each is a plugin registered through ``kvcore_register_eviction_policies``."""
