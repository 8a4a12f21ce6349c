"""Opaque page tokens: the last id of a page, URL-safe base64 without padding."""

from __future__ import annotations

import base64

from nexus_fast.errors import InvalidArgument


def encode_page_token(last_id: str) -> str:
    """The token that resumes a listing after ``last_id``."""
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    """The id a token resumes after ("" for no token); ``InvalidArgument`` if malformed."""
    if not token:
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        return base64.urlsafe_b64decode(padded.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "malformed page token") from None
