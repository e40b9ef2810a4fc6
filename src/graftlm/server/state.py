"""What the routes share (the engine and the settings) and who is calling, as FastAPI dependencies."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from graftlm.engine.adapter_finder import Source, UnknownAdapterError
from graftlm.engine.engine import Engine
from graftlm.server.auth import ANONYMOUS, KeyRing, Principal
from graftlm.server.errors import ApiError, not_found
from graftlm.server.schemas import Sampling
from graftlm.server.settings import ServerSettings


class Server:
    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.started = time.time()

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def visible(self, who: Principal) -> list[str]:
        """The adapter references `who` may use and see."""
        return [n for n in self.engine.cache.names() if who.may_use(n)]

    def adapters_for(self, body: Sampling, who: Principal) -> list[tuple[Source, float]]:
        """The adapters (and weights) a request's `model` and `adapters` name, each one `who` may use;
        one it may not use gets the same 404 as one that does not exist."""
        mix: list[tuple[str, float]] = []
        if body.model == self.model_name:
            if not who.base:
                raise not_found(body.model)
        else:
            for part in body.model.split("+"):
                name, _, weight = part.strip().partition(":")
                try:
                    mix.append((name, float(weight) if weight else 1.0))
                except ValueError:
                    raise ApiError(400, f"bad adapter weight {weight[:20]!r} in model", param="model") from None
        mix += [(a.name, a.weight) for a in body.adapters or []]
        if len({n for n, _ in mix}) != len(mix):
            raise ApiError(400, "an adapter is named twice in the request", param="model")
        found = []
        for name, weight in mix:
            if not who.may_use(name):
                raise not_found(name)
            try:
                found.append((self.engine.cache.resolve(name), weight))
            except UnknownAdapterError as e:  # a version or alias of an adapter `who` may use: say which
                raise (ApiError(404, str(e), "model_not_found", "model") if e.known else not_found(name)) from None
        return found


def get_server(request: Request) -> Server:
    return request.app.state.server


def get_caller(request: Request) -> Principal:
    """The principal of the request's `Authorization: Bearer KEY`; anonymous on a server without keys."""
    return principal_of(get_server(request).settings.keys, request.headers.get("authorization", ""))


def principal_of(keys: KeyRing, authorization: str) -> Principal:
    """The principal of an `Authorization` header's value (`Bearer KEY`); anonymous where there are no keys."""
    if not keys:
        return ANONYMOUS
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "this server needs an API key: send Authorization: Bearer KEY", "invalid_api_key")
    who = keys.lookup(token.strip())
    if who is None:
        raise ApiError(401, "the API key is not valid", "invalid_api_key")
    return who


ServerDep = Annotated[Server, Depends(get_server)]
Caller = Annotated[Principal, Depends(get_caller)]
