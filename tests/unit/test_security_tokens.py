"""JWT verification: pinned algorithms, claims, key confusion, JWKS, the cache; identity."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nexus_fast.config import RbacConfig, SecurityConfig
from nexus_fast.security.identity import Authenticator, Principal, Unauthenticated
from nexus_fast.security.tokens import issue_token
from nexus_fast.security.tools import issue_certificate

SECRET = b"s" * 40


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def auth(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Authenticator:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    (tmp_path / "key.pub").write_bytes(_public_pem(rsa_key))
    return Authenticator(
        SecurityConfig(
            jwt_secret_file=str(tmp_path / "secret"),
            jwt_public_key_file=str(tmp_path / "key.pub"),
            jwt_leeway=0.0,
        )
    )


def _claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "alice",
        "role": "operator",
        "iss": "nexus-fast",
        "aud": "nexus-fast",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def test_hs256_and_rs256_tokens_verify(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    hs = issue_token("alice", "operator", 600, secret=SECRET)
    assert auth.from_token(hs) == Principal(
        "alice", "operator", "token", None, auth.from_token(hs).expires_at
    )
    rs = issue_token("bob", "viewer", 600, private_key=rsa_key, algorithm="RS256")
    assert auth.from_token(rs).role == "viewer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_key(claims: dict[str, object], key: bytes) -> str:
    """What an attacker builds by hand (PyJWT refuses to): HS256 keyed with a PEM."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing = f"{header}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(mac)}"


def _unsigned(claims: dict[str, object]) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: _unsigned(_claims()), "algorithm"),
        # Key confusion: HS256 with the RSA public key (PEM) as the HMAC secret.
        (lambda k: hs256_with_key(_claims(), _public_pem(k)), "signature"),
        (lambda k: jwt.encode(_claims(exp=int(time.time()) - 5), SECRET), "expired"),
        (lambda k: jwt.encode(_claims(nbf=int(time.time()) + 300), SECRET), "not yet valid"),
        (lambda k: jwt.encode(_claims(aud="someone-else"), SECRET), "audience"),
        (lambda k: jwt.encode(_claims(iss="someone-else"), SECRET), "issuer"),
        (lambda k: jwt.encode(_claims(exp=None), SECRET), "'exp'"),
        (lambda k: jwt.encode(_claims(sub=None), SECRET), "'sub'"),
        (lambda k: jwt.encode(_claims(), b"x" * 40), "signature"),
        (lambda k: jwt.encode(_claims(), k, algorithm="RS384"), "algorithm"),
        (lambda k: "not.a.token", "malformed"),
        (lambda k: jwt.encode(_claims(role="node"), SECRET), "node"),  # no node:<id> sub
        (lambda k: jwt.encode(_claims(sub="node:n1"), SECRET), "node"),  # node sub, other role
    ],
)
def test_bad_tokens_are_unauthenticated(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey, make: object, reason: str
) -> None:
    token = make(rsa_key)  # type: ignore[operator]
    with pytest.raises(Unauthenticated, match=reason):
        auth.from_token(token)


def test_tampered_signature_and_payload(auth: Authenticator) -> None:
    token = issue_token("alice", "viewer", 600, secret=SECRET)
    head, body, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(Unauthenticated, match="signature"):
        auth.from_token(f"{head}.{body}.{flipped}")
    admin_body = base64.urlsafe_b64encode(
        json.dumps(
            jwt.decode(token, options={"verify_signature": False}) | {"role": "admin"}
        ).encode()
    ).rstrip(b"=")
    with pytest.raises(Unauthenticated, match="signature"):
        auth.from_token(f"{head}.{admin_body.decode()}.{sig}")


def test_node_token_names_its_node(auth: Authenticator) -> None:
    principal = auth.from_token(issue_token("node:n7", "node", 600, secret=SECRET))
    assert principal.node_id == "n7" and principal.role == "node"


def test_verified_tokens_are_cached_until_exp(auth: Authenticator) -> None:
    token = issue_token("alice", "viewer", 600, secret=SECRET)
    first = auth.from_token(token)
    assert auth.from_token(token) is first
    assert auth.tokens is not None and token in auth.tokens._cache
    expired = issue_token("alice", "viewer", 1, secret=SECRET, now=time.time() - 10)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.from_token(expired)
    assert expired not in auth.tokens._cache


def test_cached_token_is_refused_after_exp(auth: Authenticator) -> None:
    token = issue_token("alice", "viewer", 600, secret=SECRET)
    principal = auth.from_token(token)
    assert auth.tokens is not None
    # Pretend the cached entry's exp passed: it must be verified again (and fail).
    auth.tokens._cache[token] = Principal("alice", "viewer", "token", None, time.time() - 1)
    auth.tokens._decode = lambda t: (_ for _ in ()).throw(Unauthenticated("token expired"))  # type: ignore[method-assign]
    with pytest.raises(Unauthenticated):
        auth.from_token(token)
    assert principal.expires_at is not None


def test_jwks_with_es256_and_eddsa(tmp_path: Path) -> None:
    es, ed = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    keys = []
    for kid, key in (("es", es), ("ed", ed)):
        jwk = json.loads(_jwk(key.public_key()))
        jwk["kid"] = kid
        keys.append(jwk)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    auth = Authenticator(SecurityConfig(jwt_public_key_file=str(tmp_path / "jwks.json")))
    for kid, key, alg in (("es", es, "ES256"), ("ed", ed, "EdDSA")):
        token = jwt.encode(_claims(), key, algorithm=alg, headers={"kid": kid})
        assert auth.from_token(token).name == "alice"
    # HS256 is not accepted at all without a secret, whatever the header says.
    with pytest.raises(Unauthenticated):
        auth.from_token(jwt.encode(_claims(), SECRET, algorithm="HS256"))


def _jwk(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return jwt.algorithms.ECAlgorithm.to_jwk(public_key)
    return jwt.algorithms.OKPAlgorithm.to_jwk(public_key)  # type: ignore[arg-type]


def test_pinned_algorithms_refuse_others(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (tmp_path / "key.pub").write_bytes(_public_pem(rsa_key))
    auth = Authenticator(
        SecurityConfig(jwt_public_key_file=str(tmp_path / "key.pub"), jwt_algorithms=("PS256",))
    )
    with pytest.raises(Unauthenticated, match="algorithm"):
        auth.from_token(jwt.encode(_claims(), rsa_key, algorithm="RS256"))
    assert auth.from_token(jwt.encode(_claims(), rsa_key, algorithm="PS256")).name == "alice"


def test_short_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"short")
    with pytest.raises(ValueError, match="shorter"):
        Authenticator(SecurityConfig(jwt_secret_file=str(tmp_path / "secret")))


# --- certificates -----------------------------------------------------------------------


def _pem(name: str, org: str | None) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    ca = issue_certificate("ca", None)
    cert, _ = issue_certificate(name, ca, organization=org)
    return cert.public_bytes(s.Encoding.PEM)


def test_certificate_principals() -> None:
    auth = Authenticator(SecurityConfig())
    assert auth.from_pem(_pem("alice", "nexus-operator")) == Principal("alice", "operator", "cert")
    node = auth.from_pem(_pem("n1", "nexus-node"))
    assert node.node_id == "n1" and node.role == "node"
    with pytest.raises(Unauthenticated, match="no role"):
        auth.from_pem(_pem("eve", None))
    with pytest.raises(Unauthenticated, match="no role"):
        auth.from_pem(_pem("eve", "acme"))
    defaulted = Authenticator(SecurityConfig(rbac=RbacConfig(default_role="viewer")))
    assert defaulted.from_pem(_pem("eve", "acme")).role == "viewer"


def test_peercert_principals() -> None:
    auth = Authenticator(SecurityConfig())
    peercert = {
        "subject": ((("commonName", "bob"),), (("organizationName", "nexus-viewer"),)),
    }
    assert auth.from_peercert(peercert) == Principal("bob", "viewer", "cert")
    with pytest.raises(Unauthenticated, match="no credentials"):
        auth.from_peercert({})
    with pytest.raises(Unauthenticated, match="bearer tokens are not accepted"):
        auth.authenticate("Bearer abc", peercert=peercert)
    with pytest.raises(Unauthenticated, match="Bearer"):
        Authenticator(SecurityConfig()).authenticate("Basic abc")
