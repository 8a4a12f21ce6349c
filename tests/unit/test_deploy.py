"""What the deployment files say, checked against the config the server would load.

The Dockerfile, the Kubernetes manifests and the systemd unit each repeat facts the config
owns (ports, the data directory, the TLS files) or the image owns (the user id); these
tests fail when one of them drifts. tests/integration/test_deploy.py runs what they say.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nexus_fast.config import Config, load_config
from tests.deploy_files import (
    K8S,
    REPO,
    UNIT,
    dockerfile_args,
    dockerfile_stages,
    exec_form,
    install_steps,
    k8s_config_path,
    k8s_documents,
    k8s_one,
    kustomization,
    load_k8s_config,
    unit_entries,
)

PRODUCTION = REPO / "configs" / "production.toml"


def production() -> Config:
    return load_config(PRODUCTION, env={})


def under(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


# ---------------------------------------------------------------- Dockerfile


def test_base_image_pinned_by_digest() -> None:
    base = dockerfile_args()["BASE"]
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    for stage in dockerfile_stages():
        assert stage[0].args.split()[0] == "${BASE}", stage[0].args


def test_build_stage_compiles_runtime_stage_installs_wheels() -> None:
    build, runtime = dockerfile_stages()
    assert build[0].args.endswith(" AS build")
    (build_step,) = install_steps(build)
    deps_step, app_step = install_steps(runtime)
    assert build_step.args == ["build", "/wheels"]
    assert deps_step.args == ["deps", "/tmp/requirements.lock"]
    assert app_step.args == ["app", "/wheels"]
    # The dependencies install before (and so without) anything from the build stage.
    runs = [i.args for i in runtime]
    from_build = runs.index("--from=build /wheels /wheels")
    assert runs.index(next(a for a in runs if "install.sh deps" in a)) < from_build
    assert runs.index(next(a for a in runs if "install.sh app" in a)) > from_build
    # The compiler and the build tools stay in the build stage.
    assert any("gcc" in i.args for i in build if i.keyword == "RUN")
    assert not any("gcc" in i.args or "apt-get" in i.args for i in runtime if i.keyword == "RUN")
    # Each stage copies the lock file its install step reads.
    build_copies = " ".join(i.args for i in build if i.keyword == "COPY")
    runtime_copies = " ".join(i.args for i in runtime if i.keyword == "COPY")
    for name in ("requirements-build.lock", "deploy/install.sh"):
        assert name in build_copies, name
    assert "requirements.lock" in runtime_copies.split()


def _runtime(keyword: str) -> list[str]:
    return [i.args for i in dockerfile_stages()[-1] if i.keyword == keyword]


def _image_config() -> tuple[str, Config]:
    """The config file the image's ENTRYPOINT names, and what it loads to."""
    entry = exec_form(_runtime("ENTRYPOINT")[0])
    assert entry[:2] == ["nexus-fast", "--config"], entry
    target = entry[2]
    (source,) = [
        a.split()[0] for a in _runtime("COPY") if not a.startswith("--") and a.split()[1] == target
    ]
    return target, load_config(REPO / source, env={})


def test_image_runs_as_non_root_on_its_volume_and_ports() -> None:
    (user,) = _runtime("USER")
    assert user.split(":")[0] not in ("root", "0")
    target, cfg = _image_config()
    assert target.startswith("/etc/nexus-fast/")
    (volume,) = _runtime("VOLUME")
    assert under(cfg.database.path, volume), (cfg.database.path, volume)
    exposed = {int(p) for a in _runtime("EXPOSE") for p in a.split()}
    assert exposed == {cfg.server.grpc_port, cfg.server.websocket_port, cfg.server.http_port}
    # Only NEXUS_REQUIRE_EXTENSIONS by environment: anything else would outrank the file.
    env_names = set(re.findall(r"\b(NEXUS_[A-Z_]+)=", " ".join(_runtime("ENV"))))
    assert env_names == {"NEXUS_REQUIRE_EXTENSIONS"}


def test_healthcheck_reads_the_entrypoint_config() -> None:
    (health,) = _runtime("HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command)
    script = argv[1]
    assert any(a == f"deploy/healthcheck.py {script}" for a in _runtime("COPY"))
    target, _ = _image_config()
    assert argv[2:] == ["--config", target]


# ---------------------------------------------------------------- lock files and pyproject


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _lock(name: str) -> dict[str, tuple[str, int]]:
    """{package: (version, number of hashes)} of a pip-compile --generate-hashes file."""
    text = (REPO / name).read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *hashes = line.split()
        pkg, sep, version = spec.partition("==")
        assert sep, f"{name}: not pinned: {spec}"
        assert all(h.startswith("--hash=sha256:") for h in hashes), line
        out[canonicalize_name(pkg)] = (version, len(hashes))
    return out


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("requirements.lock", lambda p: p["project"]["dependencies"]),
        ("requirements-build.lock", lambda p: p["build-system"]["requires"]),
    ],
)
def test_lock_pins_every_requirement_with_hashes(lock: str, requirements: Any) -> None:
    pins = _lock(lock)
    assert all(n_hashes >= 1 for _, n_hashes in pins.values())
    for text in requirements(_pyproject()):
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} lacks {req.name} (run deploy/lock.sh)"
        assert req.specifier.contains(pins[name][0]), f"{lock}: {name}=={pins[name][0]} vs {req}"


def test_pyproject_metadata_for_an_index() -> None:
    project = _pyproject()["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), (
            f"{req.name}: no lower bound"
        )
    assert project["readme"] == "README.md"
    assert project["license"] == "Apache-2.0"
    assert all((REPO / f).is_file() for f in project["license-files"])
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    # PEP 639: a license expression replaces the License :: classifiers.
    assert not any(c.startswith("License ::") for c in project["classifiers"])


# ---------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert k8s_config_path().is_file()
    kinds = {d["kind"] for d in k8s_documents()}
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "Namespace"} <= kinds


def _statefulset() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    sts = k8s_one("StatefulSet", "nexus-fast")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return sts, pod, container


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mount path -> the volume (or volume claim template) mounted there."""
    sts = k8s_one("StatefulSet", "nexus-fast")
    volumes = {v["name"]: v for v in pod["volumes"]}
    volumes.update({c["metadata"]["name"]: {"pvc": c} for c in sts["spec"]["volumeClaimTemplates"]})
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def _port(container: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == ref]
    return int(port)


def test_statefulset_is_one_replica_on_a_pvc_holding_the_data_dir() -> None:
    sts, pod, container = _statefulset()
    cfg = load_k8s_config()
    assert sts["spec"]["replicas"] == 1  # replicas need a shared store: a later issue
    mounts = _mounts(pod, container)
    (data_mount,) = [path for path, vol in mounts.items() if "pvc" in vol]
    # The data dir is the PVC's mount or a directory in it (here: <mount>/data).
    assert under(cfg.database.path, data_mount), (cfg.database.path, data_mount)
    assert under(str(cfg.database.resolved_backup_path()), data_mount)
    claim = mounts[data_mount]["pvc"]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim["resources"]["requests"]["storage"]
    # The config file the server reads is the ConfigMap's, mounted as a directory.
    args = container["args"]
    config_file = PurePosixPath(args[args.index("--config") + 1])
    assert config_file.name == k8s_config_path().name
    config_volume = mounts[str(config_file.parent)]
    (generator,) = kustomization()["configMapGenerator"]
    assert config_volume["configMap"]["name"] == generator["name"]
    assert kustomization()["generatorOptions"]["disableNameSuffixHash"] is True
    # Every TLS / JWT file the config names lies in a mounted Secret.
    secrets = {path: v["secret"]["secretName"] for path, v in mounts.items() if "secret" in v}
    sec = cfg.security
    assert sec.auth_required and sec.tls_enabled
    for path in (sec.tls_cert_file, sec.tls_key_file, sec.tls_ca_file, sec.jwt_secret_file):
        assert any(under(_stub_target(path), m) for m in secrets), path
    # A read-only root file system still needs a writable /tmp.
    assert "emptyDir" in mounts["/tmp"]


def _stub_target(loaded: str) -> str:
    """load_k8s_config stubs /etc/nexus-fast-* files under a scratch dir: the pod's path."""
    return "/" + loaded[loaded.index("etc/nexus-fast-") :]


def test_probes_and_ports_match_the_config() -> None:
    _, _, container = _statefulset()
    cfg = load_k8s_config()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sorted(ports.values()) == sorted(
        [cfg.server.grpc_port, cfg.server.websocket_port, cfg.server.http_port]
    )
    assert not cfg.security.http_tls  # the kubelet's httpGet cannot present a client cert
    for probe, path in (("startupProbe", "/ready"), ("livenessProbe", "/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _port(container, get["port"]) == cfg.server.http_port
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["nexusctl", "status"]
    target = command[command.index("--target") + 1]
    assert target == f"127.0.0.1:{cfg.server.grpc_port}"
    tls_dir = str(PurePosixPath(_stub_target(cfg.security.tls_ca_file)).parent)
    for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
        assert under(command[command.index(flag) + 1], tls_dir), flag


def test_resources_and_security_context() -> None:
    _, pod, container = _statefulset()
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    pod_ctx = pod["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    # The uid the image's useradd gives nexus, so the PVC (fsGroup) and files agree.
    (useradd,) = [a for a in _runtime("RUN") if "useradd" in a]
    uid = int(re.search(r"--uid (\d+)", useradd).group(1))  # type: ignore[union-attr]
    assert pod_ctx["runAsUser"] == uid and pod_ctx["fsGroup"] == uid
    assert pod["automountServiceAccountToken"] is False


def test_pdb_and_services_select_the_statefulset_pods() -> None:
    sts, _, container = _statefulset()
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = k8s_one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert k8s_one("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    service = k8s_one("Service", "nexus-fast")
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert _port(container, port["targetPort"]) == port["port"]


# Keys the Kubernetes config sets differently from configs/production.toml, on purpose.
K8S_OWN = {
    "server.grpc_port", "server.websocket_port", "server.http_port", "database.path",
    "security.tls_enabled", "security.tls_cert_file", "security.tls_key_file",
    "security.tls_ca_file", "security.jwt_secret_file", "security.http_tls",
}  # fmt: skip


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_k8s_config_is_production_with_its_own_paths() -> None:
    prod = _flat(tomllib.loads(PRODUCTION.read_text()))
    k8s = _flat(tomllib.loads(k8s_config_path().read_text()))
    drift = {
        key: (prod.get(key), k8s.get(key))
        for key in prod.keys() | k8s.keys()
        if key not in K8S_OWN and prod.get(key) != k8s.get(key)
    }
    assert not drift, f"deploy/kubernetes/nexus.toml drifted from configs/production.toml: {drift}"


# ---------------------------------------------------------------- systemd


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for section, key, value in unit_entries():
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_unit_is_hardened() -> None:
    unit = _unit()
    one = {key: values[-1] for key, values in unit.items()}
    for key, value in {
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Service.NoNewPrivileges": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.Restart": "on-failure",
        "Service.RestartPreventExitStatus": "2",  # invalid configuration
        "Service.User": "nexus",
    }.items():
        assert one.get(key) == value, (key, one.get(key))
    assert int(one["Service.LimitNOFILE"]) >= 65536
    # A data dir that keeps failing stops the restarts instead of looping.
    assert int(one["Unit.StartLimitBurst"]) >= 1 and one["Unit.StartLimitIntervalSec"]
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    # The data dir is the state directory, the config the configuration directory.
    prod = production()
    assert prod.database.path == "/var/lib/" + one["Service.StateDirectory"]
    assert under(prod.database.path, one["Service.ReadWritePaths"])
    exec_start = one["Service.ExecStart"].split()
    assert exec_start[1:] == [
        "--config",
        f"/etc/{one['Service.ConfigurationDirectory']}/nexus.toml",
    ]


def test_unit_verifies_with_systemd_analyze(tmp_path: Path) -> None:
    """systemd-analyze verify and security --offline, when systemd's tools are installed.

    Without them the parsed checks above are what runs (Debian's systemd package has them).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        assert _unit()["Service.ProtectSystem"] == ["strict"]  # the parsed check, again
        return
    unit = tmp_path / UNIT.name
    # verify checks that ExecStart exists: point it at this checkout's venv.
    local = Path(shutil.which("nexus-fast") or REPO / ".venv" / "bin" / "nexus-fast")
    assert local.is_file(), "nexus-fast is not installed (make install)"
    unit.write_text(UNIT.read_text().replace("/opt/nexus-fast/bin/nexus-fast", str(local)))
    verify = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in verify.stderr.splitlines() if unit.name in line]
    assert verify.returncode == 0 and not problems, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert match, security.stdout[-500:] + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout[-2000:]
