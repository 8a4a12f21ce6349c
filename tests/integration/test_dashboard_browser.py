"""The dashboard in a real browser (Debian's chromium + chromedriver, driven by selenium).

Against the real server with ``nexus-node`` fleets: the page lists the nodes, shows a node
going down, a command reaching SUCCEEDED and an agent running, all from the event stream
without a reload, and resumes after the server restarts on the same port.

``make test`` installs chromium and chromium-driver when missing (``make chromium``); if
they are still absent this test fails and says so. ``NEXUS_DASHBOARD_SCREENSHOT=path``
(``make screenshot``) saves a screenshot of the page at the end (README's picture).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, wait_for

CHROMIUM = Path(os.environ.get("NEXUS_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("NEXUS_CHROMEDRIVER", "/usr/bin/chromedriver"))
NODE_TIMEOUT = 2.0
# Slack on top of one node timeout for the pruner tick, a heartbeat interval and a busy CI.
DOWN_SLACK = 8.0
# The restart below is about the page, not the drain: nexus-node reconnecting while the
# server drains can hold grpc's grace period open for the whole shutdown timeout.
_QUICK_STOP = {"NEXUS_SHUTDOWN_TIMEOUT": "5s"}
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1600",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium under chromedriver with a fresh profile; quit at teardown."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the dashboard test needs Debian's chromium "
            "and chromium-driver (`make chromium` installs them: apt-get install chromium "
            "chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _js(driver: Any, script: str, *args: object) -> Any:
    return driver.execute_script(script, *args)


def _node_statuses(driver: Any) -> dict[str, str]:
    return _js(  # type: ignore[no-any-return]
        driver,
        "return Object.fromEntries([...document.querySelectorAll('#nodes tr[data-node-id]')]"
        ".map(r => [r.dataset.nodeId, r.querySelector('td.status').textContent.trim()]))",
    )


def _command_state(driver: Any, command_id: str) -> str | None:
    return _js(  # type: ignore[no-any-return]
        driver,
        'const r = document.querySelector(`#commands tr[data-command-id="${arguments[0]}"]`);'
        "return r ? r.querySelector('td.state').textContent.trim() : null",
        command_id,
    )


def _submit(server: ServerProcess, node_id: str) -> str:
    with server.channel() as channel:
        reply = pb_grpc.ControlServiceStub(channel).SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[
                    pb.CommandSpec(
                        idempotency_key=f"dash-{uuid.uuid4().hex[:8]}",
                        kind="run",
                        target_node=node_id,
                        payload=b"hello",
                    )
                ]
            ),
            timeout=10,
        )
    return reply.results[0].id


def test_large_fleet_renders_only_visible_rows(
    server_factory: type, fleet_factory: type, browser: Any
) -> None:
    """Thousands of nodes: the table keeps a few dozen rows in the DOM, scrolls to any of
    them, and filters over all of them (the page stays usable at 10,000)."""
    total = 3000
    server = server_factory.create(NEXUS_HEARTBEAT_INTERVAL="5s", NEXUS_NODE_TIMEOUT="30s").start()
    fleet_factory.create(server.grpc_target, total, "--labels", "zone=a|b|c", "--ramp", "1")
    browser.get(server.http_base + "/dashboard")
    wait_for(
        lambda: browser.find_element("id", "count-ready").text == str(total),
        60,
        0.2,
        "the page counts every node ready",
    )
    rows = _js(browser, "return document.querySelectorAll('#nodes tr').length")
    assert 0 < rows < 60, rows
    _js(
        browser,
        "const s = document.getElementById('nodes-scroller'); s.scrollTop = s.scrollHeight;",
    )
    last = f"node-{total - 1:05d}"
    wait_for(lambda: last in _node_statuses(browser), 10, 0.1, "scrolled to the last node")
    assert _js(browser, "return document.querySelectorAll('#nodes tr').length") < 60
    label = browser.find_element("id", "label-filter")
    label.send_keys("zone=b")
    wait_for(
        lambda: browser.find_element("id", "shown").text == f"{total // 3} of {total} shown",
        10,
        0.1,
        "the label filter counts over the whole fleet",
    )
    assert _js(
        browser,
        "return [...document.querySelectorAll('#nodes tr[data-node-id]')]"
        ".every(r => r.textContent.includes('zone=b'))",
    )
    assert set(_node_statuses(browser).values()) == {"ready"}


def test_dashboard_follows_the_fabric_live(
    server_factory: type, fleet_factory: type, browser: Any
) -> None:
    server = server_factory.create(
        NEXUS_NODE_TIMEOUT=f"{NODE_TIMEOUT}s", NEXUS_HEARTBEAT_INTERVAL="0.5s", **_QUICK_STOP
    ).start()
    steady = fleet_factory.create(
        server.grpc_target, 6, "--id-prefix", "steady-", "--labels", "zone=a|b,tier=cpu"
    )
    doomed = fleet_factory.create(
        server.grpc_target, 2, "--id-prefix", "doomed-", "--labels", "zone=c,tier=gpu"
    )
    expected = {f"steady-{i:05d}" for i in range(6)} | {f"doomed-{i:05d}" for i in range(2)}

    browser.get(server.http_base + "/dashboard")
    wait_for(
        lambda: (
            set(_node_statuses(browser)) == expected
            and set(_node_statuses(browser).values()) == {"ready"}
        ),
        30,
        0.2,
        "the page lists every node as ready",
    )
    # Survives only if the page is never reloaded or navigated away.
    _js(browser, "window.__marker = 'still-here'")
    assert _js(browser, "return window.nexusDashboard.relists") == 1

    # The label filter narrows the table to one fleet.
    browser.find_element("id", "label-filter").send_keys("tier=gpu")
    wait_for(
        lambda: set(_node_statuses(browser)) == {"doomed-00000", "doomed-00001"},
        10,
        0.1,
        "label filter",
    )
    browser.find_element("id", "label-filter").clear()
    _js(browser, "document.getElementById('label-filter').dispatchEvent(new Event('input'))")

    # One fleet dies without a word: its nodes must show as down.
    doomed.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: (
            _node_statuses(browser).get("doomed-00000") == "down"
            and _node_statuses(browser).get("doomed-00001") == "down"
        ),
        NODE_TIMEOUT + DOWN_SLACK,
        0.1,
        "the page shows the killed fleet's nodes down",
    )
    shown_after = time.monotonic() - killed
    assert browser.find_element("id", "count-down").text == "2"
    assert all(s == "ready" for n, s in _node_statuses(browser).items() if n.startswith("steady-"))

    # A command: the page sees it reach SUCCEEDED, and its lifecycle lists the transitions.
    command_id = _submit(server, "steady-00001")
    wait_for(
        lambda: _command_state(browser, command_id) == "SUCCEEDED",
        20,
        0.1,
        "the page shows the command SUCCEEDED",
    )
    browser.find_element("css selector", f'#commands tr[data-command-id="{command_id}"]').click()
    wait_for(
        lambda: (
            _js(
                browser,
                "const s = document.getElementById('lifecycle-state');"
                "return s && s.textContent.trim()",
            )
            == "SUCCEEDED"
        ),
        10,
        0.1,
        "lifecycle panel",
    )
    steps = _js(browser, "return document.getElementById('lifecycle').textContent")
    assert "PENDING" in steps or "PLACED" in steps or "DISPATCHED" in steps, steps

    # Agents: replicas and their states.
    with server.channel() as channel:
        pb_grpc.ControlServiceStub(channel).DeployAgent(
            pb.DeployAgentRequest(spec=pb.AgentSpec(name="llm", replicas=2)), timeout=10
        )
    wait_for(
        lambda: "2 running" in _js(browser, "return document.getElementById('agents').textContent"),
        20,
        0.2,
        "the page shows both agent replicas running",
    )

    assert _js(browser, "return window.__marker") == "still-here"
    assert _js(browser, "return performance.getEntriesByType('navigation').length") == 1
    stats = _js(browser, "return window.nexusDashboard")
    assert stats["relists"] == 1 and stats["connects"] == 1, stats

    # Restart the server on the same ports: the page reconnects and resumes after its last
    # index (no re-list), and keeps following.
    before = stats["lastIndex"]
    assert server.stop() == 0
    restarted = server_factory.create(
        data_dir=server.data_dir,
        same_ports_as=server,
        NEXUS_NODE_TIMEOUT=f"{NODE_TIMEOUT}s",
        NEXUS_HEARTBEAT_INTERVAL="0.5s",
        **_QUICK_STOP,
    ).start()
    wait_for(
        lambda: (
            _js(browser, "return window.nexusDashboard.connects") >= 2
            and _js(browser, "return window.nexusDashboard.live")
        ),
        30,
        0.2,
        "the page reconnects",
    )
    second = _submit(restarted, "steady-00002")
    wait_for(
        lambda: _command_state(browser, second) == "SUCCEEDED",
        30,
        0.1,
        "after the restart, the page shows a new command SUCCEEDED",
    )
    stats = _js(browser, "return window.nexusDashboard")
    assert stats["relists"] == 1 and stats["lastIndex"] > before, stats
    assert _js(browser, "return window.__marker") == "still-here"

    # Nothing the page did broke its CSP or threw.
    problems = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE"
        and ("Content Security Policy" in entry["message"] or "Uncaught" in entry["message"])
    ]
    assert not problems, problems

    shot = os.environ.get("NEXUS_DASHBOARD_SCREENSHOT")
    if shot:
        browser.find_element("id", "lifecycle-id").clear()
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(shot), shot
    steady.stop()
    print(f"node down shown {shown_after:.1f}s after the fleet was killed")
