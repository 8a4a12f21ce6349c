"""TLS settings shared by the WSS and HTTPS listeners (gRPC has its own credentials)."""

from __future__ import annotations

import ssl

from nexus_fast.config import SecurityConfig

__all__ = ["server_ssl_context"]

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
