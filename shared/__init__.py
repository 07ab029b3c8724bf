"""What gateways and workers agree on: key names, the wire format, settings, the Redis scripts.

This package imports neither ``gateway`` nor ``worker``; they meet only in Redis, through it.
"""
