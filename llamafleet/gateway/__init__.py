"""The OpenAI-compatible HTTP gateway and the Prometheus metrics endpoint.

A supervised process of its own (``python -m llamafleet.gateway``, started by the
supervisor when the config has an ``[http]`` table or ``metrics_listen``), built on
:class:`~llamafleet.client.AsyncClient`. Nothing imports this package: it sits on top.

- :mod:`.app`: the endpoints (Starlette) and the guard (keys, limits, HTTP metrics)
- :mod:`.schemas`: the request bodies (pydantic)
- :mod:`.translate`: OpenAI requests to our calls, our results to OpenAI responses
- :mod:`.errors`: our error codes as HTTP statuses and OpenAI error bodies
- :mod:`.metrics`: the Prometheus exposition of the fleet's numbers
- :mod:`.server`: the process: uvicorn on the inherited socket, heartbeats
"""
