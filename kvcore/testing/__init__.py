"""Helpers for testing kvcore and its plugins (shipped so plugin authors can use them)."""
