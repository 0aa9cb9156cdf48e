"""API keys: X-API-Key or Authorization: Bearer, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from query_api.errors import ApiError

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of the keys in API_KEYS."
)
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <one of API_KEYS>.")


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of key lengths.
    return hashlib.sha256(value.encode("utf-8")).digest()


class KeyChecker:
    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._digests = [_digest(k.get_secret_value()) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, candidate: str) -> bool:
        digest = _digest(candidate)
        matched = False
        for known in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(digest, known)
        return matched

    def dependency(self) -> object:
        """A FastAPI dependency that raises 401 unless the request carries a valid key."""

        async def require_api_key(
            request: Request,
            api_key: Annotated[str | None, Depends(_api_key_header)],
            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> None:
            candidate = api_key or (bearer.credentials if bearer else None)
            if not candidate:
                raise ApiError(
                    401,
                    "unauthorized",
                    "an API key is required: send X-API-Key: <key> or Authorization: Bearer <key>",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not self.accepts(candidate):
                raise ApiError(
                    401, "unauthorized", "the API key is not valid",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            request.state.authenticated = True

        return Depends(require_api_key)
