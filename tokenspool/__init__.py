"""The ``tokenspool`` command: starts gateways, workers and the embedded Redis-compatible server.

It stands apart from ``gateway``, ``worker`` and ``shared``: it only starts processes and wires their
settings; the processes meet in Redis."""
