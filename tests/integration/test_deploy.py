"""The image, built without Docker: its install steps in clean venvs, then its server probed.

Docker has no engine here, so the test does what the Dockerfile does, from the Dockerfile:
the build context is the files the build stage COPYs (minus .dockerignore), each stage is
a fresh venv, and the ``deploy/install.sh`` calls of the RUN lines run as written (only
``/wheels`` is a temporary directory). The installed ``nexus-fast`` then starts on the
Kubernetes ConfigMap's nexus.toml (TLS and JWT from ``nexus-fast certs``, loopback ports)
and answers what the cluster and the image ask: the StatefulSet's httpGet and exec probes
and the image's HEALTHCHECK, run as written. pip's cache makes the second run quick.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import nexus_fast
from nexus_fast.benchmark.procs import free_ports
from tests.deploy_files import (
    REPO,
    Instruction,
    dockerfile_stages,
    exec_form,
    install_steps,
    k8s_config_path,
    k8s_one,
)

from .conftest import HOST

STEP_TIMEOUT = 420.0  # one install step: ~20 s alone; a cold pip cache or a loaded machine, more


def _clean_env() -> dict[str, str]:
    """The environment of a RUN line: no venv, no twin switches, no PYTHONPATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.defpath
    return env


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns .dockerignore uses: a matched directory takes its files."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            if fnmatch.fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:]):
                return True
    return False


def build_context(dest: Path) -> None:
    """What ``docker build .`` sends and the build stage COPYs, honouring .dockerignore."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    build = dockerfile_stages()[0]
    for ins in build:
        if ins.keyword != "COPY" or ins.args.startswith("--from"):
            continue
        *sources, _ = ins.args.split()
        for source in sources:
            src = REPO / source
            paths = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for path in paths:
                rel = path.relative_to(REPO).as_posix()
                if _ignored(rel, patterns):
                    continue
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)


def copied_in(stage: list[Instruction], dest: str) -> Path | None:
    """The context file a stage's ``COPY SOURCE... DEST`` put at ``dest`` (None: not copied)."""
    for ins in stage:
        if ins.keyword != "COPY" or ins.args.startswith("--"):
            continue
        *sources, target = ins.args.split()
        for source in sources:
            placed = target + Path(source).name if target.endswith("/") else target
            if placed == dest:
                return REPO / source
    return None


def run_step(python: Path, script: Path, args: list[str], env: dict[str, str], cwd: Path) -> str:
    full = {**_clean_env(), **env, "PYTHON": str(python)}
    proc = subprocess.run(
        ["sh", str(script), *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"install.sh {' '.join(args)} failed:\n{out[-4000:]}"
    return out


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.once
@pytest.mark.timeout(900)  # ~60 s alone; a cold pip cache or a loaded machine takes longer
def test_image_install_steps_then_probes(tmp_path: Path) -> None:
    started = time.monotonic()
    context, wheels = tmp_path / "src", tmp_path / "wheels"
    build_context(context)
    build_stage, runtime_stage = dockerfile_stages()
    (build_step,) = install_steps(build_stage)
    deps_step, app_step = install_steps(runtime_stage)

    def local_args(stage: list[Instruction], args: list[str]) -> list[str]:
        """/wheels is a temporary directory; a file the stage COPYs in is its context file."""
        return [str(wheels) if a == "/wheels" else str(copied_in(stage, a) or a) for a in args]

    def build() -> None:
        python = make_venv(tmp_path / "build")
        # WORKDIR /src: the build stage's script path is relative to the context.
        run_step(python, context / build_step.script, local_args(build_stage, build_step.args),
                 build_step.env, context)  # fmt: skip

    def runtime_deps() -> Path:
        python = make_venv(tmp_path / "runtime")
        script = copied_in(runtime_stage, deps_step.script)
        assert script is not None, deps_step.script
        run_step(python, script, local_args(runtime_stage, deps_step.args), deps_step.env,
                 tmp_path)  # fmt: skip
        return python

    # Each stage starts from a bare Python. The runtime stage's dependency step needs nothing
    # from the build stage (it comes before COPY --from=build), so, as under BuildKit, the
    # two run at once.
    with ThreadPoolExecutor(2) as pool:
        runtime = pool.submit(runtime_deps)
        build()
        python = runtime.result()
    script = copied_in(runtime_stage, app_step.script)
    assert script is not None, app_step.script
    out = run_step(python, script, local_args(runtime_stage, app_step.args), app_step.env,
                   tmp_path)  # fmt: skip
    compiled = {name: "c" for name in nexus_fast.HOT_PATHS}  # every hot path, compiled
    assert f"hot paths: {compiled}" in out
    bin_dir = python.parent
    # Build tools stayed in the build stage.
    site = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('Cython'), u.find_spec('grpc_tools'))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert site.split() == ["None", "None"], site
    install_seconds = time.monotonic() - started

    # TLS material the way docs/deployment.md makes it, with the installed nexus-fast.
    pki = tmp_path / "pki"
    subprocess.run(
        [str(bin_dir / "nexus-fast"), "certs", "--out", str(pki), "--viewer", "probe"],
        check=True, capture_output=True, timeout=60, env=_clean_env(),
    )  # fmt: skip
    # The ConfigMap's nexus.toml, with the pod's paths and ports mapped onto this machine.
    grpc_port, ws_port, http_port = free_ports(3)
    ports = {50053: grpc_port, 8081: ws_port, 8082: http_port}
    text = k8s_config_path().read_text()
    for key, port in (("grpc_port", 50053), ("websocket_port", 8081), ("http_port", 8082)):
        text, n = re.subn(rf"^{key} = {port}\b", f"{key} = {ports[port]}", text, flags=re.M)
        assert n == 1, key
    paths = {
        "/etc/nexus-fast-tls": str(pki),
        "/etc/nexus-fast-jwt": str(pki),
        "/var/lib/nexus-fast": str(tmp_path / "pvc"),
        "/etc/nexus-fast": str(tmp_path / "etc"),
    }

    def local(value: str) -> str:
        for pod_path, here in paths.items():  # longest prefixes first (dict order)
            if value == pod_path or value.startswith(pod_path + "/"):
                return here + value[len(pod_path) :]
        return value

    text = re.sub(r'"(/[^"]+)"', lambda m: f'"{local(m.group(1))}"', text)
    text = text.replace('host = "0.0.0.0"', f'host = "{HOST}"')
    config = tmp_path / "etc" / "nexus.toml"
    config.parent.mkdir()
    config.write_text(text)
    (tmp_path / "pvc").mkdir()  # the PVC's mount point exists; the data dir inside does not

    sts = k8s_one("StatefulSet", "nexus-fast")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = [local(a) for a in container["args"]]
    env = {**_clean_env(), "NEXUS_REQUIRE_EXTENSIONS": "1"}
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [str(bin_dir / "nexus-fast"), *args], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        get = container["startupProbe"]["httpGet"]
        startup_url = f"http://{HOST}:{ports[named[get['port']]]}{get['path']}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if http_status(startup_url) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(
                "startup probe never passed:\n" + (tmp_path / "server.log").read_text()[-3000:]
            )
        ready_seconds = time.monotonic() - started - install_seconds
        assert (tmp_path / "pvc" / "data" / "data.mdb").is_file()  # the data dir in the PVC

        live = container["livenessProbe"]["httpGet"]
        assert http_status(f"http://{HOST}:{ports[named[live['port']]]}{live['path']}") == 200

        # The readiness probe as the kubelet execs it: nexusctl, mTLS, the probe certificate.
        command = [local(a) for a in container["readinessProbe"]["exec"]["command"]]
        target = command.index("--target") + 1
        command[target] = f"{HOST}:{ports[int(command[target].rsplit(':', 1)[1])]}"
        probe = subprocess.run(
            [str(bin_dir / command[0]), *command[1:]],
            capture_output=True, text=True, timeout=30, env=_clean_env(),
        )  # fmt: skip
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr

        # The image's HEALTHCHECK, as written, with its paths mapped: it finds the port in
        # the file, and follows NEXUS_HTTP_PORT like the server would.
        (health,) = [i.args for i in runtime_stage if i.keyword == "HEALTHCHECK"]
        check = exec_form(health.partition(" CMD ")[2])
        check_argv = [str(python), str(copied_in(runtime_stage, check[1])), *check[2:]]
        assert check_argv[1] != "None", check[1]
        check_argv[check_argv.index("--config") + 1] = str(config)
        assert subprocess.run(check_argv, env=_clean_env(), timeout=30).returncode == 0
        (elsewhere,) = free_ports(1)
        moved = subprocess.run(
            check_argv, env={**_clean_env(), "NEXUS_HTTP_PORT": str(elsewhere)},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert moved.returncode == 1 and str(elsewhere) in moved.stderr, moved.stderr

        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        down = subprocess.run(check_argv, env=_clean_env(), capture_output=True, timeout=30)
        assert down.returncode == 1
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    print(
        f"image install steps {install_seconds:.1f}s, start to ready {ready_seconds:.1f}s, "
        f"total {time.monotonic() - started:.1f}s"
    )
