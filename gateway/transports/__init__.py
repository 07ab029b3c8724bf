"""The transports: each encodes and writes what a stream session (:mod:`gateway.session`) yields."""
