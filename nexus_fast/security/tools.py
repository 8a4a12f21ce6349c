"""``nexus-fast certs`` and ``nexus-fast token``: development credentials in one command.

``certs`` writes a development CA, a server certificate (SAN localhost, 127.0.0.1, ::1),
one client certificate per principal (CN = name, O = ``nexus-<role>``), an HS256 secret
and a ``nexus.toml`` that turns all of it on; every file is created 0600 in a 0700
directory. ``token`` prints a JWT with the issuer and audience the server expects by
default. See docs/security.md for the three-command secure start.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nexus_fast.config import parse_duration
from nexus_fast.security.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER, issue_token

__all__ = ["cert_pem", "issue_certificate", "key_pem", "main", "write_private"]

_Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file created 0600 (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def issue_certificate(
    common_name: str,
    issuer: _Issuer | None,
    *,
    organization: str | None = None,
    server: bool = False,
    client: bool = False,
    days: int = 365,
) -> _Issuer:
    """A P-256 certificate: a CA when ``issuer`` is None, else a leaf signed by it.

    ``server``: for a listener (localhost SANs); with ``client`` too it may also be
    presented as a client certificate (a cluster replica dialling the leader)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(attributes)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]
                + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
            ),
            critical=False,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    """``cert`` as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (write it with :func:`write_private`)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = issue_certificate("nexus-fast development CA", None, days=args.days)
    write_private(out / "ca.pem", cert_pem(ca[0]))
    write_private(out / "ca-key.pem", key_pem(ca[1]))
    server = issue_certificate("nexus-fast", ca, server=True, days=args.days)
    write_private(out / "server.pem", cert_pem(server[0]))
    write_private(out / "server-key.pem", key_pem(server[1]))
    written = ["ca.pem", "server.pem"]
    for role in ("node", "operator", "viewer", "admin"):
        for name in getattr(args, role) or ():
            cert, key = issue_certificate(name, ca, organization=f"nexus-{role}", days=args.days)
            write_private(out / f"{role}-{name}.pem", cert_pem(cert))
            write_private(out / f"{role}-{name}-key.pem", key_pem(key))
            written.append(f"{role}-{name}.pem")
    for name in args.replica or ():  # server and client at once: see docs/cluster.md
        cert, key = issue_certificate(
            name, ca, organization="nexus-replica", server=True, client=True, days=args.days
        )
        write_private(out / f"replica-{name}.pem", cert_pem(cert))
        write_private(out / f"replica-{name}-key.pem", key_pem(key))
        written.append(f"replica-{name}.pem")
    secret = out / "jwt.secret"
    if not secret.exists():
        write_private(secret, base64.urlsafe_b64encode(secrets.token_bytes(48)) + b"\n")
    root = out.resolve()
    write_private(
        out / "nexus.toml",
        (
            "# Written by nexus-fast certs: every port needs a certificate or a token.\n"
            "[security]\n"
            "auth_required = true\n"
            "tls_enabled = true\n"
            "http_tls = true\n"
            f'tls_cert_file = "{root / "server.pem"}"\n'
            f'tls_key_file = "{root / "server-key.pem"}"\n'
            f'tls_ca_file = "{root / "ca.pem"}"\n'
            f'jwt_secret_file = "{root / "jwt.secret"}"\n'
        ).encode(),
    )
    print(f"wrote {', '.join(written)}, jwt.secret and nexus.toml to {root}")
    return 0


def _token(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except (TypeError, ValueError) as exc:
        print(f"nexus-fast token: --ttl: {exc}", file=sys.stderr)
        return 2
    if ttl <= 0:
        print("nexus-fast token: --ttl must be positive", file=sys.stderr)
        return 2
    try:
        if args.secret_file:
            secret = Path(args.secret_file).read_bytes().strip()
            token = issue_token(
                args.sub, args.role, ttl, secret=secret, issuer=args.issuer, audience=args.audience
            )
        else:
            from nexus_fast.security.tokens import load_private_key

            key, algorithm = load_private_key(args.private_key_file)
            token = issue_token(
                args.sub,
                args.role,
                ttl,
                private_key=key,
                algorithm=algorithm,
                issuer=args.issuer,
                audience=args.audience,
            )
    except (OSError, ValueError) as exc:
        print(f"nexus-fast token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexus-fast", description="nexus-fast credentials.")
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="write a development CA and certificates")
    certs.add_argument("--out", required=True, help="directory to write (created 0700)")
    for role in ("node", "operator", "viewer", "admin"):
        certs.add_argument(
            f"--{role}", nargs="+", metavar="NAME", action="extend", help=f"{role} principals"
        )
    certs.add_argument(
        "--replica",
        nargs="+",
        metavar="NAME",
        action="extend",
        help="cluster replicas: server certificates that also act as clients (O=nexus-replica)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    token = sub.add_parser("token", help="print a JWT bearer token")
    keys = token.add_mutually_exclusive_group(required=True)
    keys.add_argument("--secret-file", help="HS256 secret (security.jwt_secret_file)")
    keys.add_argument("--private-key-file", help="PEM private key: RS256, ES256 or EdDSA")
    token.add_argument("--sub", required=True, help='subject: a name, or "node:<id>"')
    token.add_argument("--role", required=True, help="admin, operator, viewer, node, ...")
    token.add_argument("--ttl", default="1h", help='lifetime, e.g. "15m", "1h" (default 1h)')
    token.add_argument("--issuer", default=DEFAULT_ISSUER, help="iss claim (default nexus-fast)")
    token.add_argument("--audience", default=DEFAULT_AUDIENCE, help="aud (default nexus-fast)")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``certs`` or ``token``; returns the exit code (2 for bad arguments)."""
    args = _parser().parse_args(list(argv))
    if args.command == "certs":
        return _certs(args)
    return _token(args)
