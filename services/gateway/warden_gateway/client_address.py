"""The address of the client a request came from, for per-client budgets.

uvicorn puts the peer address in the ASGI scope, or the one ``X-Forwarded-For`` names
when the peer is a trusted proxy (uvicorn's ``FORWARDED_ALLOW_IPS``, by default only
127.0.0.1). Behind a reverse proxy on another host, set ``FORWARDED_ALLOW_IPS`` to its
address, or every client shares the proxy's budget.
"""

from __future__ import annotations

from starlette.requests import Request


def client_address(request: Request) -> str | None:
    """The client's IP address as the server saw it, or None when unknown."""
    client = request.scope.get("client")
    if not client:
        return None
    return str(client[0])
