"""Client connections for nexus-node and nexus-bench: TLS, mTLS and bearer tokens.

Written once, used by both tools (and their worker processes):

- ``--tls-ca FILE`` turns TLS on (server certificate checked against these roots);
  ``--tls-cert FILE --tls-key FILE`` add a client certificate (mTLS);
  ``--tls-server-name NAME`` overrides the name checked in the server certificate.
- ``--token TOKEN`` (or the ``NEXUS_TOKEN`` environment variable, which keeps the token out
  of ``ps``) is sent on every gRPC call as the metadata ``authorization: Bearer <token>``
  and on WebSocket upgrades as the ``Authorization`` header.
- ``--node-token-secret FILE`` (development and tests only: it hands the client the
  server's HS256 secret) mints one token per simulated node, ``sub = node:<id>``, sent on
  that node's NodeService calls: a fleet of many nodes in one process passes the server's
  node restriction, which one shared certificate or token cannot.

With TLS the token rides on gRPC call credentials (grpc-core adds it to every call, no
Python per message). Without TLS grpc-core refuses call credentials, so client
interceptors add the same metadata; a plaintext token is for loopback development only.
"""

from __future__ import annotations

import argparse
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import grpc.aio

TOKEN_ENV = "NEXUS_TOKEN"
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
NODE_TOKEN_TTL_S = 3600.0  # minted node tokens; renewed at half their life

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """How a client proves who it is and checks the server: TLS files and a bearer token."""

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None
    node_token_secret: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace | None) -> ClientAuth:
        """Read ``--tls-*``/``--token`` from parsed arguments; the token falls back to
        ``NEXUS_TOKEN``. Missing attributes count as not given."""
        token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
        return cls(
            tls_ca=getattr(args, "tls_ca", None) or None,
            tls_cert=getattr(args, "tls_cert", None) or None,
            tls_key=getattr(args, "tls_key", None) or None,
            tls_server_name=getattr(args, "tls_server_name", None) or None,
            token=token,
            node_token_secret=getattr(args, "node_token_secret", None) or None,
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> ClientAuth:
        """The inverse of :meth:`to_dict` (a worker process gets its auth this way); the
        token comes from ``NEXUS_TOKEN`` when the dict has none."""
        doc = dict(doc or {})
        doc["token"] = doc.get("token") or os.environ.get(TOKEN_ENV)
        return cls(**{k: doc.get(k) or None for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, str | None]:
        """A JSON-able copy for a worker process's spec, without the token: a spec travels
        on a command line, so the token goes in the environment (:meth:`env`)."""
        doc = asdict(self)
        doc["token"] = None
        return doc

    def env(self) -> dict[str, str]:
        """Environment for a child process that should send the same token."""
        return {TOKEN_ENV: self.token} if self.token else {}

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context (for ``wss://``): these roots, this client certificate."""
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    @property
    def tls(self) -> bool:
        """True when the channel is TLS (any TLS file given)."""
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    def plaintext(self) -> ClientAuth:
        """The same token without TLS (for a baseline server that has no TLS port)."""
        return ClientAuth(token=self.token)

    def for_nodes(self) -> ClientAuth:
        """The auth of a node channel: with per-node tokens the shared token stays off it
        (each node call carries its own, :meth:`node_metadata`)."""
        if self.node_token_secret and self.token:
            return ClientAuth(
                self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name, None,
                self.node_token_secret,
            )  # fmt: skip
        return self

    def node_metadata(self, node_id: str) -> tuple[tuple[str, str], ...]:
        """Call metadata for one node's NodeService calls: its own minted token with
        ``--node-token-secret``, else nothing (the channel's credentials speak for it)."""
        if not self.node_token_secret:
            return ()
        return ((AUTHORIZATION, f"Bearer {_NODE_TOKENS.get(self.node_token_secret, node_id)}"),)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata carrying the token; empty without one."""
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()

    def http_headers(self) -> dict[str, str]:
        """The ``Authorization`` header for a WebSocket upgrade or HTTP request."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class _NodeTokens:
    """Node tokens minted from a secret file, one per node id, renewed at half-life."""

    def __init__(self) -> None:
        self._secrets: dict[str, bytes] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def get(self, secret_file: str, node_id: str) -> str:
        now = time.time()
        hit = self._tokens.get((secret_file, node_id))
        if hit is not None and hit[1] > now:
            return hit[0]
        from nexus_fast.security.tokens import issue_token  # only fleets that mint need it

        secret = self._secrets.get(secret_file)
        if secret is None:
            with open(secret_file, "rb") as fp:
                secret = self._secrets[secret_file] = fp.read().strip()
        token = issue_token(f"node:{node_id}", "node", NODE_TOKEN_TTL_S, secret=secret, now=now)
        self._tokens[(secret_file, node_id)] = (token, now + NODE_TOKEN_TTL_S / 2)
        return token


_NODE_TOKENS = _NodeTokens()


def add_arguments(group: Any, *, server_name: bool = True) -> None:
    """Add ``--tls-ca/--tls-cert/--tls-key`` (and ``--tls-server-name``) and ``--token``."""
    group.add_argument("--tls-ca", metavar="FILE", help="PEM root certificates (enables TLS)")
    group.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate chain (mTLS)")
    group.add_argument("--tls-key", metavar="FILE", help="PEM client private key (mTLS)")
    if server_name:
        group.add_argument("--tls-server-name", metavar="NAME", help="override the TLS server name")
    group.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"bearer token sent on every call (default: ${TOKEN_ENV}; prefer the "
        "variable, a command line is visible to other users)",
    )
    group.add_argument(
        "--node-token-secret",
        metavar="FILE",
        help="DEVELOPMENT/TESTS ONLY: the server's HS256 secret (security.jwt_secret_file); "
        "each simulated node sends its own minted token (sub node:<id>, role node), so a "
        "fleet passes the node restriction; never give a client a production secret",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent TLS options (argparse exits 2) and unreadable files."""
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    for flag in ("tls_ca", "tls_cert", "tls_key", "node_token_secret"):
        path = getattr(args, flag, None)
        if path and not os.access(path, os.R_OK):
            parser.error(f"--{flag.replace('_', '-')} {path}: not a readable file")
    token = getattr(args, "token", None)
    if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
        parser.error("--token must be a non-empty single line")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fp:
        return fp.read()


def channel_credentials(auth: ClientAuth) -> grpc.ChannelCredentials:
    """TLS credentials (plus the token as call credentials); ``auth.tls`` must be true."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(auth.tls_ca),
        private_key=_read(auth.tls_key),
        certificate_chain=_read(auth.tls_cert),
    )
    if auth.token:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(auth.token)
        )
    return creds


class _AddToken:
    """Adds ``authorization: Bearer <token>`` to a call's metadata (plaintext channels)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files an interceptor under the first of the four kinds it is an instance of,
# so each kind needs its own class.


class _UnaryUnaryToken(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamToken(_AddToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryToken(_AddToken, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamToken(_AddToken, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def token_interceptors(auth: ClientAuth) -> list[Any]:
    """The client interceptors that send ``auth``'s token on every kind of call."""
    metadata = auth.metadata()
    if not metadata:
        return []
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    return [kind(metadata) for kind in kinds]


def open_channel(
    target: str, auth: ClientAuth | None = None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``: TLS when ``auth.tls``, the token on every call."""
    auth = auth or ClientAuth()
    opts = list(options)
    if auth.tls_server_name:
        opts.append(("grpc.ssl_target_name_override", auth.tls_server_name))
    if auth.tls:
        return grpc.aio.secure_channel(target, channel_credentials(auth), options=opts)
    if auth.token:
        return grpc.aio.insecure_channel(
            target, options=opts, interceptors=token_interceptors(auth)
        )
    return grpc.aio.insecure_channel(target, options=opts)
