"""The tokenspool worker: pulls requests for one model from Redis, runs them on an engine, and appends
every delta to the request's event stream. It never imports ``gateway``; the two meet only in Redis."""
