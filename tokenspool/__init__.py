"""The ``tokenspool`` command, and the Python client (:mod:`tokenspool.client`).

It stands apart from ``gateway``, ``worker`` and ``shared``: the command starts processes and wires their
settings (the processes meet in Redis); the client speaks to gateways over HTTP only."""
