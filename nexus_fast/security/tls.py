"""TLS material for the three listeners, reloadable while the server runs.

The WSS and HTTPS listeners share :func:`server_ssl_context` contexts; a reload loads the
new certificate chain into those same contexts (:func:`reload_cert_chain`), so every new
connection is handshaken with it while open connections keep theirs. gRPC uses
:class:`GrpcCertificates`: dynamic server credentials whose fetcher hands grpc-core the new
certificate at the next handshake.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass

import grpc

from nexus_fast.config import SecurityConfig

__all__ = ["GrpcCertificates", "TlsMaterial", "reload_cert_chain", "server_ssl_context"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(sec: SecurityConfig) -> ssl.SSLContext | None:
    """Server context with ``min_tls_version`` and ``cipher_suites``; client certificates
    are required when ``tls_ca_file`` is set. None when TLS is off."""
    if not sec.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[sec.min_tls_version]
    if sec.cipher_suites:
        # Applies to TLS 1.2; OpenSSL's TLS 1.3 suites are all strong and stay as they are.
        context.set_ciphers(sec.cipher_suites)
    context.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
    if sec.tls_ca_file:
        context.load_verify_locations(sec.tls_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class TlsMaterial:
    """The bytes of the server's certificate chain, key and client CA (empty: none)."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, sec: SecurityConfig) -> TlsMaterial:
        """Read the files named by ``sec`` (blocking: call it off the loop).

        Raises ValueError naming the file when the pair does not load (a bad PEM, a key
        that does not match the certificate); OSError when a file cannot be read.
        """
        with open(sec.tls_cert_file, "rb") as cert, open(sec.tls_key_file, "rb") as key:
            material = cls(cert.read(), key.read(), b"")
        if sec.tls_ca_file:
            with open(sec.tls_ca_file, "rb") as ca:
                material = cls(material.cert, material.key, ca.read())
        # The same check a handshake context makes, so a broken pair is refused now, not at
        # the next client's handshake.
        try:
            probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            probe.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
            if material.ca:
                probe.load_verify_locations(cadata=material.ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ValueError(
                f"{sec.tls_cert_file} / {sec.tls_key_file}: not a usable certificate and key "
                f"({exc.reason or exc})"
            ) from None
        return material


def reload_cert_chain(context: ssl.SSLContext, sec: SecurityConfig) -> None:
    """Load the certificate chain and CA of ``sec`` into a live ``context``.

    New handshakes use the new certificate; open connections keep theirs. A CA bundle is
    added to the trusted ones (OpenSSL cannot drop a CA from a context): removing a client
    CA from WSS/HTTPS takes a restart (gRPC replaces it). Switching each handshake to a new
    context from ``sni_callback`` would drop it, but picows' native TLS engine (aiofastnet)
    crashes the process when that callback is set (picows 2.3, aiofastnet 1.2): do not.
    """
    context.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
    if sec.tls_ca_file:
        context.load_verify_locations(sec.tls_ca_file)


class GrpcCertificates:
    """Dynamic gRPC server credentials: :meth:`update` is picked up by the next handshake."""

    def __init__(self, material: TlsMaterial) -> None:
        self._lock = threading.Lock()  # the fetcher runs on a grpc-core thread
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.material = material
        self.require_client_auth = bool(material.ca)
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(material),
            self._fetch,
            require_client_authentication=self.require_client_auth,
        )

    def update(self, material: TlsMaterial) -> None:
        """Serve ``material`` from the next handshake on."""
        configuration = _certificate_configuration(material)
        with self._lock:
            self._pending = configuration
        self.material = material

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # grpc-core asks before each handshake; None keeps the current certificate.
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


def _certificate_configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.ca or None
    )
