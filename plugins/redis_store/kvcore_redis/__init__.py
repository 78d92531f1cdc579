"""kvcore-redis: a kvcore tier on Redis or Redis Cluster, shared by every engine that uses it."""

from kvcore_redis.settings import RedisSettings
from kvcore_redis.tier import RedisTier

__all__ = ["RedisSettings", "RedisTier"]
