"""[security] authentication keys, [security.rbac] tables and the start-up check."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus_fast.config import ConfigError, RbacConfig, RoleConfig, load_config
from nexus_fast.security.layer import SecurityLayer, check_security

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return path


def test_rbac_tables_parse(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            """
[security]
allowed_origins = ["https://ui.example.com", "ui.example.com:8443"]
jwt_leeway = "5s"
[security.rbac]
default_role = "deployer"
[[security.rbac.roles]]
name = "deployer"
permissions = ["agent.*", "*.read"]
[[security.rbac.roles]]
name = "viewer"
permissions = ["node.read"]
""",
        ),
        env={},
    )
    sec = cfg.security
    assert sec.allowed_origins == ("https://ui.example.com", "ui.example.com:8443")
    assert sec.jwt_leeway == 5.0
    assert sec.rbac == RbacConfig(
        True,
        "deployer",
        (RoleConfig("deployer", ("agent.*", "*.read")), RoleConfig("viewer", ("node.read",))),
    )
    assert cfg.to_dict()["security"]["rbac"]["roles"][0]["name"] == "deployer"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[security.rbac]\nenabeld = true\n", "security.rbac.enabeld"),
        ('[security.rbac]\nenabled = "yes"\n', "security.rbac.enabled"),
        ('[[security.rbac.roles]]\nname = "Bad Name"\n', "security.rbac.roles[0].name"),
        (
            '[[security.rbac.roles]]\nname = "x"\npermissions = ["nodes"]\n',
            "security.rbac.roles[0].permissions",
        ),
        ('[[security.rbac.roles]]\nname = "admin"\n', "security.rbac"),
        ('[[security.rbac.roles]]\nname = "node"\npermissions = ["*"]\n', "security.rbac"),
        ('[security.rbac]\ndefault_role = "nobody"\n', "security.rbac"),
        ('[security]\njwt_algorithms = ["none"]\n', "security.jwt_algorithms"),
        ('[security]\njwt_algorithms = ["HS256"]\n', "security.jwt_algorithms"),
        ('[security]\njwt_algorithms = ["RS256"]\n', "security.jwt_algorithms"),
        ('[security]\nmin_tls_version = "1.1"\n', "security.min_tls_version"),
        ("[security]\nhttp_tls = true\n", "security.http_tls"),
        ('[security]\njwt_secret_file = "/nonexistent/secret"\n', "security.jwt_secret_file"),
        ('[security]\nallowed_hosts = "a.example"\n', "security.allowed_hosts"),
    ],
)
def test_bad_security_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            _write(tmp_path, "[security]\n" + text if "[security" not in text else text), env={}
        )
    assert info.value.key == key, str(info.value)


def test_production_refuses_to_start_without_tls_and_jwt_key() -> None:
    cfg = load_config(REPO / "configs" / "production.toml", env={})
    assert cfg.security.auth_required and cfg.security.min_tls_version == "1.3"
    with pytest.raises(ConfigError) as info:
        check_security(cfg)
    text = str(info.value)
    assert "\n" not in text
    assert "TLS" in text and "jwt_secret_file" in text and "production.toml" in text


def test_development_is_open() -> None:
    cfg = load_config(REPO / "configs" / "development.toml", env={})
    assert cfg.security.auth_required is False
    check_security(cfg)
    assert SecurityLayer.from_config(cfg) is None


def test_unusable_key_is_refused_at_start(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("too short")
    key = tmp_path / "k"
    key.write_text("k")
    cfg = load_config(
        _write(
            tmp_path,
            f"""[security]
auth_required = true
tls_enabled = true
tls_cert_file = "{key}"
tls_key_file = "{key}"
jwt_secret_file = "{secret}"
""",
        ),
        env={},
    )
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        check_security(cfg)
