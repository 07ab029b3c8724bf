"""The tokenspool gateway: OpenAI-compatible HTTP in, Redis Streams in the middle, Server-Sent Events out.

It never imports ``worker``; the two meet only in Redis, through ``shared``."""
