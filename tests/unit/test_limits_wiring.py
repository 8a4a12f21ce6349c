"""How [security.limits] is loaded, mapped to the wire and installed (no sockets)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from nexus_fast.api import status
from nexus_fast.config import Config, ConfigError, SecurityConfig, load_config
from nexus_fast.security.grpc_auth import LimitsInterceptor
from nexus_fast.security.layer import SecurityLayer
from nexus_fast.security.limits import (
    LimitExceeded,
    LimitsConfig,
    NodeSlotRelease,
    PrincipalLimits,
    RateLimited,
)
from nexus_fast.units import MB

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path, env={})


def _error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return info.value


# --------------------------------------------------------------------------- config


def test_no_limits_table_means_no_limits() -> None:
    assert load_config(env={}).security.limits.enabled is False
    assert SecurityLayer.from_config(Config()) is None  # nothing installed: as before


def test_a_limits_table_enables_them_and_parses_sizes(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        '[security.limits]\nrequests_per_second = 5\nburst = 10\nbyte_burst = "8MB"\n',
    )
    limits = cfg.security.limits
    assert limits.enabled is True  # a table without `enabled` means on
    assert (limits.requests_per_second, limits.burst, limits.byte_burst) == (5, 10, 8 * MB)
    assert cfg.sources["security.limits"] == str(tmp_path / "c.toml")


def test_unknown_and_bad_limit_keys_are_refused_naming_the_key(tmp_path: Path) -> None:
    err = _error(tmp_path, "[security.limits]\nburts = 3\n")
    assert err.key == "security.limits" and "security.limits.burts" in str(err)
    err = _error(tmp_path, "[security.limits]\nmax_streams = 0\n")
    assert "security.limits.max_streams" in str(err)
    err = _error(tmp_path, "[security.limits]\nmax_streams = 10\ntotal_streams = 10\n")
    assert "security.limits.total_streams" in str(err)
    err = _error(tmp_path, "[security]\nlimits = 3\n")
    assert err.key == "security.limits"


def test_per_principal_ws_cap_must_stay_below_max_connections(tmp_path: Path) -> None:
    text = "[server]\nmax_connections = 10\n[security.limits]\nmax_ws_connections = 10\n"
    err = _error(tmp_path, text)
    assert err.key == "security.limits.max_ws_connections"
    assert "server.max_connections" in str(err)
    # Off, the cap is not in force, so it is not checked either.
    _load(tmp_path, text.replace("max_ws_connections = 10", "enabled = false"))


def test_production_enables_limits_development_does_not() -> None:
    production = load_config(CONFIGS / "production.toml", env={}).security.limits
    assert production.enabled
    assert production.max_ws_connections < production.total_ws_connections
    assert production.byte_burst >= Config().server.max_message_size
    assert not load_config(CONFIGS / "development.toml", env={}).security.limits.enabled


# --------------------------------------------------------------------------- wire


@pytest.mark.parametrize(
    ("error", "code", "frame", "close"),
    [
        (RateLimited("request", "alice", 0.0004), "rate_limited", "error", None),
        (LimitExceeded("streams", "alice", 2, "principal"), "limit_exceeded", "close", 4029),
    ],
)
def test_limit_errors_have_their_rows(
    error: RateLimited | LimitExceeded, code: str, frame: str, close: int | None
) -> None:
    assert status.grpc_status(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.error_code(error) == code
    assert status.http_status(error) == 429
    assert status.row(error).ws_frame == frame
    assert status.ws_close_code(error) == close
    assert int(status.http_headers(error)["Retry-After"]) >= 1
    (name, value), *_ = status.grpc_trailers(error)
    assert name == status.RETRY_AFTER_TRAILER and int(value) >= 1  # never "retry in 0 ms"


def test_sub_millisecond_waits_round_up() -> None:
    trailers = dict(status.grpc_trailers(RateLimited("request", "a", 0.0004)))
    assert trailers[status.RETRY_AFTER_TRAILER] == "1"
    assert status.http_headers(RateLimited("request", "a", 2.01))["Retry-After"] == "3"


# --------------------------------------------------------------------------- layer


def test_limits_without_auth_install_only_the_limits() -> None:
    config = Config(security=SecurityConfig(limits=LimitsConfig()))
    layer = SecurityLayer.from_config(config)
    assert layer is not None and not layer.authenticating
    assert layer.limits is not None
    assert [type(i) for i in layer.grpc_interceptors()] == [LimitsInterceptor]
    assert len(layer.http_middlewares()) == 1
    assert layer.ws_admit is None  # no credentials asked for
    assert [type(x) for x in layer.node_listeners()] == [NodeSlotRelease]


def test_node_slot_release_frees_the_node_id() -> None:
    limits = PrincipalLimits(LimitsConfig(max_nodes=1, total_nodes=5))
    limits.register_node("ops", "n1")
    with pytest.raises(LimitExceeded):
        limits.register_node("ops", "n2")

    class Node:
        id = "n1"

    NodeSlotRelease(limits).node_removed(Node())
    limits.register_node("ops", "n2")
    assert limits.nodes.held("ops") == 1
