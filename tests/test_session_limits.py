"""mybinder.org's session limits beside idle and age culling: the CPU-hour budget (a session
that burned its CPU seconds is stopped, through a real ``binderbox serve``) and the memory
limit (a kernel over it is killed and restarted, the Jupyter server lives on; a real hub,
proxy and dockerd)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import sqlite3
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import docker
import pytest
import requests
import websocket
from tests.conftest import commit_all
from tests.test_launch import (  # noqa: F401 - fixtures used by name
    delete_user,
    execute_request,
    hub_settings,
    proxy_command,
    session_containers,
    start_session,
    tiny_image,
    wait_until,
)
from tests.test_serve import serving

from binderbox.config import Settings
from binderbox.errors import UsageError
from binderbox.launch import ManagedHub
from binderbox.launch.cpu_budget import (
    CpuBudget,
    MeterUnavailable,
    SessionCpu,
    over_budget,
    stop_query,
)
from binderbox.launch.hub import render_config
from binderbox.launch.kernel_oom import KERNEL_CONFIG_DIR, config_archive, server_config
from binderbox.launch.options import LABEL_USER

# --- pure ---------------------------------------------------------------------------


def test_limit_settings_default_to_mybinder_org_and_are_checked() -> None:
    settings = Settings()
    assert settings.session_cpu_seconds_max == 3600  # one CPU-hour
    assert settings.session_kernel_oom_score_adj == 1000  # on
    assert Settings().with_overrides(session_cpu_seconds_max=0).session_cpu_seconds_max == 0
    for bad, message in [
        ({"session_cpu_seconds_max": -1}, "session_cpu_seconds_max"),
        ({"session_cpu_check_every": 0}, "session_cpu_check_every"),
        ({"session_kernel_oom_score_adj": 1001}, "1 to 1000"),
        ({"session_kernel_oom_score_adj": -5}, "1 to 1000"),
    ]:
        with pytest.raises(UsageError, match=message):
            Settings().with_overrides(**bad)


def test_hub_config_gives_the_spawner_the_kernels_score(tmp_path: Path) -> None:
    settings = Settings().with_overrides(state_dir=str(tmp_path))
    text = render_config(settings, state_dir=tmp_path, proxy=Path("/x"), hub_id="a")
    assert "c.BinderSpawner.kernel_oom_score_adj = 1000" in text
    off = render_config(
        settings.with_overrides(session_kernel_oom_score_adj=0),
        state_dir=tmp_path,
        proxy=Path("/x"),
        hub_id="a",
    )
    assert "c.BinderSpawner.kernel_oom_score_adj = 0" in off


def test_kernel_config_is_python_in_a_root_owned_folder() -> None:
    compile(server_config(700), "jupyter_server_config.py", "exec")
    assert 'b"700"' in server_config(700)
    with pytest.raises(ValueError):
        server_config(0)
    with tarfile.open(fileobj=io.BytesIO(config_archive(1000))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        config = members[f"{KERNEL_CONFIG_DIR[1:]}/jupyter_server_config.py"]
        assert (config.uid, config.mode) == (0, 0o644)
        assert members["etc/binderbox"].isdir() and "etc" not in members  # /etc left alone
        assert tar.extractfile(config).read().decode() == server_config(1000)


def test_over_budget_picks_sessions_at_or_past_it_and_the_query_names_the_reason() -> None:
    usage = [SessionCpu("a", 4.9), SessionCpu("b", 5.0), SessionCpu("c", 80.0)]
    assert [s.user for s in over_budget(usage, 5)] == ["b", "c"]
    assert over_budget(usage, 0) == []  # off
    query = stop_query(SessionCpu("c", 80.04), 5, "https://example.org/org/repo")
    assert query == "reason=cpu-budget&cpu_seconds=80.0&budget=5&repo=https://example.org/org/repo"


class BrokenMeter:
    async def cpu_usage(self) -> list[SessionCpu]:
        raise MeterUnavailable("dockerd is gone")


def test_a_meter_that_fails_is_said_once_not_every_round() -> None:
    said: list[str] = []
    budget = CpuBudget(BrokenMeter(), lambda: None, budget=5, every=1, say=said.append)  # type: ignore[arg-type, return-value]
    for _ in range(3):
        assert asyncio.run(budget.check(None)) == []  # type: ignore[arg-type]
    assert said == ["The CPU budget cannot be checked: dockerd is gone"]


class FlakyMeter:
    """Fails its first round with an unexpected error, then reports the given sessions."""

    def __init__(self, usage: list[SessionCpu]) -> None:
        self.usage, self.rounds = usage, 0

    async def cpu_usage(self) -> list[SessionCpu]:
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("the stats API answered nonsense")
        return self.usage


class FakeHub:
    """The part of HubClient the budget uses, as an in-process fake of our own interface."""

    def __init__(self, servers: dict[str, dict]) -> None:
        self.servers = servers
        self.calls: list[tuple[str, str]] = []

    async def __aenter__(self) -> FakeHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def get_user(self, name: str) -> dict | None:
        return {"name": name, "servers": {"": self.servers[name]}} if name in self.servers else None

    async def stop_server(self, name: str, *, query: str = "") -> None:
        self.calls.append(("stop", f"{name}?{query}"))

    async def delete_user(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.servers.pop(name, None)


def test_the_watcher_outlives_a_bad_round_and_stops_only_running_sessions() -> None:
    meter = FlakyMeter(
        [SessionCpu("burner", 9.5), SessionCpu("starting", 50.0), SessionCpu("calm", 1.0)]
    )
    hub = FakeHub(
        {
            "burner": {"pending": None, "user_options": {"repo_url": "https://x.org/r"}},
            "starting": {"pending": "spawn", "user_options": {}},
            "calm": {"pending": None, "user_options": {}},
        }
    )
    said: list[str] = []
    budget = CpuBudget(meter, lambda: hub, budget=5, every=0.05, say=said.append)  # type: ignore[arg-type, return-value]
    budget.start()
    try:
        wait_until(lambda: ("delete", "burner") in hub.calls, 10, "the burner stopped")
    finally:
        budget.stop()
    assert said[0] == "The CPU budget check failed: the stats API answered nonsense"
    assert said[1] == (
        "Stopping session burner (https://x.org/r): it used 9.5 CPU seconds, over the budget "
        "of 5 (session_cpu_seconds_max)."
    )
    assert hub.calls[:2] == [
        ("stop", "burner?reason=cpu-budget&cpu_seconds=9.5&budget=5&repo=https://x.org/r"),
        ("delete", "burner"),
    ]
    # Still starting: left for a later round; under the budget: never touched.
    assert {target.split("?")[0] for _, target in hub.calls} == {"burner"}
    assert meter.rounds >= 2 and not budget._thread


def test_no_budget_means_no_watcher() -> None:
    budget = CpuBudget(FlakyMeter([]), lambda: None, budget=0, every=1, say=print)  # type: ignore[arg-type, return-value]
    budget.start()
    assert budget._thread is None


# --- kernels over the memory limit (real hub, proxy, dockerd) ------------------------


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory: pytest.TempPathFactory, proxy_command: Path) -> Iterator:  # noqa: F811
    """A hub whose sessions may hold 300 MB, with idle culling off."""
    settings = hub_settings(
        tmp_path_factory.mktemp("limits-hub"),
        proxy_command,
        session_mem_limit="300M",
        session_mem_guarantee="100M",
        cull_idle_timeout=0,
    )
    with ManagedHub(settings) as hub:
        yield hub


class Kernel:
    """One kernel of a session, over its websocket."""

    def __init__(self, url: str, token: str) -> None:
        auth = {"Authorization": f"token {token}"}
        made = requests.post(f"{url}api/kernels", headers=auth, json={}, timeout=60)
        assert made.status_code == 201, made.text
        self.id = made.json()["id"]
        self.ws = websocket.create_connection(
            f"{url.replace('http://', 'ws://', 1)}api/kernels/{self.id}/channels?token={token}",
            timeout=60,
        )
        self.states: list[str] = []

    def send(self, code: str) -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps(execute_request(msg_id, code)))
        return msg_id

    def output(self, msg_id: str, timeout: float = 60) -> str:
        """What the request printed (its stream output), once it has replied."""
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            message = self._next(deadline)
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            assert message["msg_type"] != "error", message["content"]
            if message["msg_type"] == "stream":
                text += message["content"]["text"]
            if message["msg_type"] == "execute_reply":
                return text
        raise AssertionError(f"no reply from the kernel within {timeout} s")

    def wait_until_answering(self, timeout: float) -> None:
        """Ask kernel_info until its iopub status comes back, as JupyterLab does after a
        restart: before that, output of a fresh kernel can be lost (ZeroMQ's late
        subscriber) even though its replies arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg_id = uuid.uuid4().hex
            request = execute_request(msg_id, "")
            request["header"]["msg_type"] = "kernel_info_request"
            request["content"] = {}
            self.ws.send(json.dumps(request))
            round_end = min(deadline, time.monotonic() + 2)
            with contextlib.suppress(websocket.WebSocketTimeoutException):
                while time.monotonic() < round_end:
                    message = self._next(round_end)
                    if (
                        message["msg_type"] == "status"
                        and message.get("parent_header", {}).get("msg_id") == msg_id
                    ):
                        return
        raise AssertionError(f"the kernel did not answer within {timeout} s")

    def wait_for_state(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while state not in self.states:
            if time.monotonic() > deadline:
                raise AssertionError(f"the kernel went through {self.states}, not {state!r}")
            self._next(deadline)

    def _next(self, deadline: float) -> dict:
        self.ws.settimeout(max(0.1, deadline - time.monotonic()))
        message = json.loads(self.ws.recv())
        if message["msg_type"] == "status":
            self.states.append(message["content"]["execution_state"])
        return message

    def close(self) -> None:
        self.ws.close()


def oom_scores(container) -> dict[str, int]:
    """oom_score_adj of the container's processes as this machine sees them, by role."""
    scores = {}
    for row in container.top(ps_args="-eo pid,args")["Processes"]:
        pid, command = row[0], row[-1]
        role = "kernel" if "ipykernel" in command else "server" if "jupyter" in command else None
        if role:
            scores[role] = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    return scores


@pytest.mark.docker
def test_a_kernel_over_the_memory_limit_is_restarted_and_the_server_lives_on(
    small_hub: ManagedHub,
    tiny_image: str,  # noqa: F811
    docker_client: docker.DockerClient,
) -> None:
    session = start_session(small_hub, tiny_image)
    kernel = Kernel(session.url, session.token)
    try:
        (container,) = session_containers(docker_client, **{LABEL_USER: session.user})
        started = container.attrs["State"]["StartedAt"]
        said = kernel.output(kernel.send("print(open('/proc/self/oom_score_adj').read())"))
        assert said.strip() == "1000"
        assert oom_scores(container) == {"kernel": 1000, "server": 0}

        began = time.monotonic()
        kernel.send("hog = []\nwhile True:\n    hog.append(bytearray(10_000_000))")
        kernel.wait_for_state("restarting", 60)
        print(f"\nkernel killed {time.monotonic() - began:.1f} s into the allocation")

        # The same kernel id answers again, in a fresh process (the hog is gone).
        kernel.wait_until_answering(90)
        said = kernel.output(kernel.send("print('hog' in globals(), 6 * 7)"), timeout=90)
        assert said.strip() == "False 42"
        status = requests.get(
            f"{session.url}api/status", params={"token": session.token}, timeout=30
        )
        assert status.status_code == 200, status.text
        kernels = requests.get(
            f"{session.url}api/kernels", params={"token": session.token}, timeout=30
        ).json()
        assert [k["id"] for k in kernels] == [kernel.id]
        container.reload()
        assert container.status == "running"
        assert container.attrs["State"]["StartedAt"] == started  # the server never restarted
        assert oom_scores(container) == {"kernel": 1000, "server": 0}  # the restart too
    finally:
        kernel.close()
        delete_user(small_hub, session.user)


@pytest.mark.docker
def test_memory_held_by_a_kernels_child_processes_does_not_kill_the_server(
    small_hub: ManagedHub,
    tiny_image: str,  # noqa: F811
    docker_client: docker.DockerClient,
) -> None:
    """Each child is smaller than the server, which the OOM killer would pick without the
    kernels' score (tried: the container exited 137); with it, a child or the kernel goes."""
    session = start_session(small_hub, tiny_image)
    kernel = Kernel(session.url, session.token)
    try:
        (container,) = session_containers(docker_client, **{LABEL_USER: session.user})
        started = container.attrs["State"]["StartedAt"]
        kernel.send(
            "import subprocess, sys, time\n"
            "hold = 'import time; x = bytearray(30_000_000); time.sleep(8)'\n"
            "kids = [subprocess.Popen([sys.executable, '-c', hold]) for _ in range(12)]\n"
            "print(sorted(str(kid.wait()) for kid in kids))"
        )
        # Either the kernel prints its children's exit codes (some killed: -9) or it was
        # the one killed and restarted; the server answers in both cases.
        deadline = time.monotonic() + 60
        printed = ""
        while not printed and "restarting" not in kernel.states:
            message = kernel._next(deadline)
            if message["msg_type"] == "stream":
                printed = message["content"]["text"]
        assert "restarting" in kernel.states or "-9" in printed, printed
        kernel.wait_until_answering(90)
        said = kernel.output(kernel.send("print(6 * 7)"), timeout=90)
        assert said.strip() == "42"
        status = requests.get(
            f"{session.url}api/status", params={"token": session.token}, timeout=30
        )
        assert status.status_code == 200, status.text
        container.reload()
        assert container.status == "running"
        assert container.attrs["State"]["StartedAt"] == started
    finally:
        kernel.close()
        delete_user(small_hub, session.user)


# --- the CPU budget, through binderbox serve --------------------------------------------


@pytest.mark.docker
def test_a_session_that_burns_its_cpu_budget_is_stopped_and_an_idle_one_is_not(
    tmp_path_factory, base_image, git_server, tmp_path, docker_client
) -> None:
    work = tmp_path / "burner"
    work.mkdir()
    (work / "README.md").write_text("A session that burns CPU.\n")
    commit_all(work)
    repo = git_server.publish(work, "burner.git")
    budget = 12
    with serving(
        tmp_path_factory,
        "cpu",
        BINDERBOX_SESSION_CPU_SECONDS_MAX=str(budget),
        BINDERBOX_SESSION_CPU_CHECK_EVERY="1",
        BINDERBOX_CULL_IDLE_TIMEOUT="0",
    ) as served:
        path = f"/build/git/{quote(repo, safe='')}/HEAD"
        idle, busy = served.stream(path)[-1], served.stream(path)[-1]
        assert idle["phase"] == busy["phase"] == "ready", (idle, busy)
        user = urlsplit(busy["url"]).path.strip("/").split("/")[-1]
        assert session_containers(docker_client, **{LABEL_USER: user})

        kernel = Kernel(busy["url"], busy["token"])
        began = time.monotonic()
        try:
            kernel.send("while True:\n    pass")
            wait_until(
                lambda: not session_containers(docker_client, **{LABEL_USER: user}),
                90,
                "the busy session's container removed",
            )
        finally:
            kernel.close()
        took = time.monotonic() - began
        print(f"\nbusy session stopped {took:.1f} s after its loop began (budget {budget} s)")
        assert took >= budget - 4  # its start-up used a few CPU seconds of the budget

        state = Path(served.env["BINDERBOX_STATE_DIR"])
        wait_until(lambda: user not in hub_user_names(state), 30, "the hub user removed")
        said = served.log.read_text()
        stop = re.search(
            rf"Stopping session {user} \({re.escape(repo)}\): it used ([\d.]+) CPU seconds, "
            rf"over the budget of {budget} \(session_cpu_seconds_max\)\.",
            said,
        )
        assert stop, said[-3000:]
        assert budget <= float(stop.group(1)) < budget + 10
        hub_log = (state / "jupyterhub.log").read_text()
        assert (
            f"DELETE /hub/api/users/{user}/server?reason=cpu-budget&cpu_seconds={stop.group(1)}"
            f"&budget={budget}&repo={repo}" in hub_log
        ), hub_log[-3000:]

        # The idle session of the same repository goes on.
        idle_user = urlsplit(idle["url"]).path.strip("/").split("/")[-1]
        assert [c.status for c in session_containers(docker_client, **{LABEL_USER: idle_user})] == [
            "running"
        ]
        assert idle_user in hub_user_names(state)
        status = requests.get(
            f"{idle['url']}api/status", params={"token": idle["token"]}, timeout=30
        )
        assert status.status_code == 200
        assert "Stopping session" not in said.replace(stop.group(0), "")


def hub_user_names(state_dir: Path) -> set[str]:
    """The users in the hub's own database (read-only)."""
    db = sqlite3.connect(f"file:{state_dir / 'jupyterhub.sqlite'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT name FROM users")}
    finally:
        db.close()
