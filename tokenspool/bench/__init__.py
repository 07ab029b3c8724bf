"""``tokenspool bench``: what the broker costs, measured side by side with the floor and a naive relay.

One module per piece: ``sse_client`` (a raw-socket HTTP/SSE client cheap enough not to measure itself),
``load`` (closed- and open-loop drivers and their statistics), ``targets`` (the processes under test, pinned
to CPUs), ``floor``, ``naive`` and ``lean`` (the comparison servers: no broker, the broker people write
first, the least a broker of tokenspool's shape does), ``ceiling`` (a bare ASGI app writing
pre-built events: the most a Python server can send here), ``report`` (table, JSON, PNG) and ``main`` (the
command and its scenarios).
"""
