"""The transports: each encodes and writes what a stream session (:mod:`tokenspool.gateway.session`) yields."""
