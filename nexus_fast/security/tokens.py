"""JWT bearer tokens: verification with pinned algorithms, a bounded cache, and issuing.

Algorithms come from ``security.jwt_algorithms`` (or, when empty, from the configured key:
HS256 for ``jwt_secret_file``; RS256, ES256 and EdDSA for ``jwt_public_key_file``), never
from the token header. The HMAC secret is only ever the secret file, and a public key is
only used with algorithms of its own type, so a token "signed" with the public key as an
HMAC secret (key confusion) or with ``alg: none`` never verifies. ``exp``, ``iss``, ``aud``
and ``sub`` are required; ``exp``, ``nbf`` and ``iat`` are checked with
``security.jwt_leeway``. PyJWT and cryptography do all the cryptography.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nexus_fast.config import SecurityConfig
from nexus_fast.security.principal import Principal, Unauthenticated

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "MIN_SECRET_BYTES",
    "TokenVerifier",
    "issue_token",
    "load_private_key",
]

DEFAULT_ISSUER: Final = "nexus-fast"
DEFAULT_AUDIENCE: Final = "nexus-fast"
MIN_SECRET_BYTES: Final = 32
_CACHE_SIZE: Final = 4096
_REQUIRED: Final = ["exp", "iss", "aud", "sub"]
_PUBLIC_DEFAULT: Final = ("RS256", "ES256", "EdDSA")

_ERRORS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience is not accepted"),
    (jwt.InvalidIssuerError, "token issuer is not accepted"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "token algorithm is not accepted"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.DecodeError, "malformed token"),
)


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the '{exc.claim}' claim"
    for cls, text in _ERRORS:
        if isinstance(exc, cls):
            return text
    return "invalid token"


def _fits(key: object, algorithm: str) -> bool:
    """True when ``algorithm`` is of the public key's own type."""
    if isinstance(key, rsa.RSAPublicKey):
        return algorithm[:2] in ("RS", "PS")
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (algorithm, key.curve.name) in (
            ("ES256", "secp256r1"),
            ("ES384", "secp384r1"),
            ("ES512", "secp521r1"),
        )
    if isinstance(key, ed25519.Ed25519PublicKey):
        return algorithm == "EdDSA"
    return False


def _load_public_keys(path: str) -> list[tuple[str | None, object]]:
    """``[(kid, key)]`` from a PEM public key, a PEM certificate or a JWKS file."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"{"):
        keys: list[tuple[str | None, object]] = []
        for jwk in jwt.PyJWKSet.from_json(data.decode()).keys:
            keys.append((jwk.key_id, jwk.key))
        return keys
    if b"BEGIN CERTIFICATE" in data:
        return [(None, x509.load_pem_x509_certificate(data).public_key())]
    return [(None, serialization.load_pem_public_key(data))]


def _read_secret(path: str) -> bytes:
    secret = Path(path).read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"security.jwt_secret_file {path}: secret shorter than {MIN_SECRET_BYTES} bytes"
        )
    return secret


class TokenVerifier:
    """Verifies bearer tokens against the configured keys; remembers good ones until exp.

    Raises ValueError at construction when a key file is unusable (start-up names it).
    """

    def __init__(self, config: SecurityConfig) -> None:
        self.issuer = config.jwt_issuer
        self.audience = config.jwt_audience
        self.leeway = config.jwt_leeway
        pinned = config.jwt_algorithms
        # (kid, key, algorithms this key may verify)
        self._keys: list[tuple[str | None, Any, list[str]]] = []
        if config.jwt_secret_file:
            hmac = [a for a in pinned if a.startswith("HS")] if pinned else ["HS256"]
            if hmac:
                self._keys.append((None, _read_secret(config.jwt_secret_file), hmac))
        if config.jwt_public_key_file:
            wanted = [a for a in pinned if not a.startswith("HS")] if pinned else _PUBLIC_DEFAULT
            try:
                public = _load_public_keys(config.jwt_public_key_file)
            except (ValueError, TypeError, jwt.PyJWTError) as exc:
                raise ValueError(
                    f"security.jwt_public_key_file {config.jwt_public_key_file}: "
                    f"not a PEM public key, certificate or JWKS ({exc})"
                ) from None
            for kid, key in public:
                algorithms = [a for a in wanted if _fits(key, a)]
                if algorithms:
                    self._keys.append((kid, key, algorithms))
        if not self._keys:
            raise ValueError("security.jwt_algorithms: no algorithm fits the configured keys")
        self.algorithms = sorted({a for _, _, algs in self._keys for a in algs})
        self._cache: collections.OrderedDict[str, Principal] = collections.OrderedDict()

    def verify(
        self, token: str, to_principal: Callable[[Mapping[str, Any]], Principal]
    ) -> Principal:
        """The principal of a valid token; raises :class:`Unauthenticated` with the reason."""
        cache = self._cache
        hit = cache.get(token)
        if hit is not None:
            if hit.expires_at is not None and hit.expires_at + self.leeway > time.time():
                cache.move_to_end(token)
                return hit
            del cache[token]
        claims = self._decode(token)
        principal = to_principal(claims)
        cache[token] = principal
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return principal

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            # Only the key id is read from the header, to pick a JWKS key; never the alg.
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        candidates = [k for k in self._keys if k[0] is None or k[0] == kid] or self._keys
        failure: Exception | None = None
        for _, key, algorithms in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options={"require": _REQUIRED},
                )
                return claims
            except (jwt.InvalidAlgorithmError, jwt.InvalidSignatureError) as exc:
                # Not this key (or not this key's type): try the next one.
                if failure is None or isinstance(exc, jwt.InvalidSignatureError):
                    failure = exc
            except jwt.PyJWTError as exc:
                raise Unauthenticated(_reason(exc)) from None
        raise Unauthenticated(_reason(failure or jwt.DecodeError()))


def load_private_key(path: str) -> tuple[Any, str]:
    """A PEM private key and the algorithm ``nexus-fast token`` signs with for it."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        return key, algorithm.get(key.curve.name, "ES256")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "EdDSA"
    raise ValueError(f"{path}: unsupported private key type {type(key).__name__}")


def issue_token(
    sub: str,
    role: str,
    ttl: float,
    *,
    secret: bytes | None = None,
    private_key: Any = None,
    algorithm: str | None = None,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    now: float | None = None,
) -> str:
    """Sign a token for ``sub`` with ``role``, valid for ``ttl`` seconds from ``now``."""
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": sub,
        "role": role,
        "iss": issuer,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
    }
    if secret is not None:
        return jwt.encode(claims, secret, algorithm=algorithm or "HS256")
    if private_key is None:
        raise ValueError("issue_token needs a secret or a private key")
    return jwt.encode(claims, private_key, algorithm=algorithm or "RS256")
