"""Parts that die come back: a real ``binderbox serve`` whose JupyterHub, proxy and serve
itself are killed with SIGKILL (and, in a test of its own that only runs when asked,
whose dockerd is restarted); after each, the sessions answer again and nothing is lost.

The first tests drive the supervisor alone with an in-process hub of ours (no Docker).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import docker
import pytest
import requests
from tests.conftest import commit_all, firewall_possible
from tests.test_serve import Served, served_repo, serving, start_serve, wait_until

from binderbox.errors import BinderboxError
from binderbox.launch.firewall import bridge_name
from binderbox.launch.hub import hub_id_for
from binderbox.launch.supervisor import DOCKERD, HUB, PROXY, Supervisor
from binderbox.service.buildlimits import CGROUP_ROOT, limit_files
from binderbox.state import SQLITE_FILE

# ---------- the supervisor alone, with a hub of our own ----------


class FakeHub:
    """A hub that dies when told to, and whose restarts may fail."""

    def __init__(self) -> None:
        self.log_path = Path("/nonexistent/jupyterhub.log")
        self.code: int | None = None
        self.restarts = 0
        self.fail_restart = False
        self.proxy = 100

    def exited(self) -> int | None:
        return self.code

    def restart(self, timeout: float = 60) -> None:
        if self.fail_restart:
            raise BinderboxError("port 8081 is taken")
        self.restarts += 1
        self.code = None

    def proxy_pid(self) -> int | None:
        return self.proxy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def supervised(hub: FakeHub, clock: Clock, docker: list[bool] | None = None):
    said: list[str] = []
    docker = docker if docker is not None else [True]
    reapplied: list[int] = []

    def reapply() -> list[str]:
        reapplied.append(1)
        return ["Session firewall: on."]

    sup = Supervisor(
        hub,
        say=said.append,
        docker_up=lambda: docker[0],
        reapply=reapply,
        limit=3,
        window=60,
        clock=clock,
    )
    return sup, said, reapplied


def restarts(sup: Supervisor) -> dict[str, float]:
    found = {}
    for family in sup.collect():
        for sample in family.samples:
            if sample.name == "binderbox_restarts_total":
                found[sample.labels["part"]] = sample.value
    return found


def test_a_dead_hub_is_started_again_once_and_said_once():
    hub, clock = FakeHub(), Clock()
    sup, said, _ = supervised(hub, clock)
    sup.tick()
    assert hub.restarts == 0 and said == []
    hub.code = -9
    sup.tick()
    assert hub.restarts == 1
    assert restarts(sup)[HUB] == 1
    assert [line for line in said if "exited" in line] == [
        "JupyterHub exited (code -9); starting it again (see /nonexistent/jupyterhub.log)."
    ]
    sup.tick()  # up again: nothing more
    assert hub.restarts == 1 and sup.checks() == []


def test_a_hub_that_keeps_dying_is_backed_off_and_health_says_so():
    hub, clock = FakeHub(), Clock()
    sup, said, _ = supervised(hub, clock)
    for _ in range(2):
        hub.code = 1
        sup.tick()
        clock.now += 5
    assert hub.restarts == 2 and sup.checks() == []
    hub.code = 1
    sup.tick()  # the third death within 60 s: no restart, a back-off
    assert hub.restarts == 2
    assert said[-1] == (
        "JupyterHub exited (code 1); it died 3 times within 60 s, so binderbox tries again in 60 s."
    )
    (check,) = sup.checks()
    assert check["service"] == HUB and not check["ok"]
    assert check["message"].startswith("JupyterHub died 3 times within 60 s; binderbox waits 60 s")
    clock.now += 59
    sup.tick()
    assert hub.restarts == 2  # still waiting
    clock.now += 2
    sup.tick()
    assert hub.restarts == 3
    # Dying again at once doubles the wait.
    hub.code = 1
    sup.tick()
    assert hub.restarts == 3 and "waits 120 s" in sup.checks()[0]["message"]
    clock.now += 121
    sup.tick()
    assert hub.restarts == 4
    # A whole window up: well again.
    clock.now += 61
    sup.tick()
    assert sup.checks() == []


def test_a_restart_that_fails_counts_as_a_death_and_is_said():
    hub, clock = FakeHub(), Clock()
    sup, said, _ = supervised(hub, clock)
    hub.code, hub.fail_restart = 1, True
    for _ in range(3):
        sup.tick()
        clock.now += 1
    assert any("could not be started again: port 8081 is taken" in line for line in said)
    assert "died 3 times" in sup.checks()[0]["message"]
    assert restarts(sup).get(HUB, 0) == 0


def test_a_new_proxy_pid_is_a_proxy_restart(tmp_path):
    hub, clock = FakeHub(), Clock()
    hub.proxy = os.getpid()  # alive
    sup, said, _ = supervised(hub, clock)
    sup.tick()
    assert restarts(sup)[PROXY] == 0
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        hub.proxy = sleeper.pid
        sup.tick()
        assert restarts(sup)[PROXY] == 1
        assert any(f"started it again (pid {sleeper.pid})" in line for line in said)
        sup.tick()
        assert restarts(sup)[PROXY] == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_dockerd_back_puts_the_firewalls_back_once():
    hub, clock = FakeHub(), Clock()
    docker_up = [True]
    sup, said, reapplied = supervised(hub, clock, docker_up)
    sup.tick()
    assert reapplied == []
    docker_up[0] = False
    sup.tick()
    sup.tick()
    assert said.count("dockerd does not answer; builds and launches fail until it is back.") == 1
    docker_up[0] = True
    sup.tick()
    sup.tick()
    assert reapplied == [1] and restarts(sup)[DOCKERD] == 1
    assert said[-1] == "dockerd answers again; put back: Session firewall: on."


# ---------- a real serve ----------


def hub_pid(served: Served) -> int:
    return int((state_dir(served) / "jupyterhub.pid").read_text().strip())


def proxy_pid(served: Served) -> int:
    return int((state_dir(served) / "proxy.pid").read_text().strip())


def state_dir(served: Served) -> Path:
    return Path(served.env["BINDERBOX_STATE_DIR"])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def answers(ready: dict) -> bool:
    """The session answers through the proxy with its token."""
    try:
        response = requests.get(
            f"{ready['url']}api/status", params={"token": ready["token"]}, timeout=5
        )
    except requests.RequestException:
        return False
    return response.status_code == 200


def health(served: Served) -> tuple[int, dict]:
    try:
        response = requests.get(served.url + "/health", timeout=10)
    except requests.RequestException:
        return 0, {}
    return response.status_code, response.json()


def metric(served: Served, name: str, part: str) -> float:
    text = requests.get(served.url + "/metrics", timeout=10).text
    found = re.search(rf'^{name}\{{part="{re.escape(part)}"\}} (\S+)$', text, re.MULTILINE)
    assert found, text
    return float(found[1])


def said(served: Served) -> str:
    assert served.log is not None
    return served.log.read_text()


@pytest.fixture(scope="module")
def recovering(tmp_path_factory, base_image) -> Iterator[Served]:
    # A short window, so that the crash loop below is reached (and left) quickly.
    with serving(
        tmp_path_factory,
        "recover",
        BINDERBOX_RESTART_LIMIT="3",
        BINDERBOX_RESTART_WINDOW="30",
        BINDERBOX_PER_REPO_QUOTA="10",
    ) as served:
        yield served


@pytest.fixture(scope="module")
def session(recovering, git_server, tmp_path_factory) -> dict:
    """A session launched before anything is killed (its build finished, its log kept)."""
    url = served_repo(git_server, tmp_path_factory.mktemp("repo"), "survivor")
    ready = recovering.stream(f"/build/git/{quote(url, safe='')}/main")[-1]
    assert ready["phase"] == "ready", ready
    assert answers(ready)
    ready["spec"] = f"/build/git/{quote(url, safe='')}/main"
    return ready


@pytest.mark.docker
def test_a_killed_hub_comes_back_and_finds_its_sessions(recovering, session):
    before = hub_pid(recovering)
    os.kill(before, signal.SIGKILL)
    began = time.monotonic()
    wait_until(
        lambda: health(recovering)[0] == 200 and hub_pid(recovering) != before,
        30,
        "the hub started again",
    )
    assert time.monotonic() - began < 30
    # The new hub found the session in its database and routed it through its new proxy.
    wait_until(lambda: answers(session), 30, "the session answering again")
    assert metric(recovering, "binderbox_restarts_total", "JupyterHub") == 1
    assert metric(recovering, "binderbox_part_up", "JupyterHub") == 1
    assert said(recovering).count("JupyterHub exited (code -9)") == 1
    assert said(recovering).count("JupyterHub is back (restart 1)") == 1
    # binderbox still talks to the new hub (same service token): a new launch works.
    again = recovering.stream(session["spec"])
    assert again[-1]["phase"] == "ready", again[-1]
    assert answers(again[-1])


@pytest.mark.docker
def test_a_killed_proxy_comes_back_with_every_route(recovering, session):
    before = proxy_pid(recovering)
    hub_before = hub_pid(recovering)
    os.kill(before, signal.SIGKILL)
    wait_until(lambda: not answers(session), 10, "the session unreachable with the proxy dead")
    wait_until(
        lambda: proxy_pid(recovering) != before and alive(proxy_pid(recovering)),
        20,
        "a new proxy",
    )
    wait_until(lambda: answers(session), 20, "the session answering through the new proxy")
    assert hub_pid(recovering) == hub_before  # the hub lived on; it restarted its proxy
    wait_until(
        lambda: metric(recovering, "binderbox_restarts_total", "configurable-http-proxy") == 1,
        10,
        "the proxy restart counted",
    )
    assert said(recovering).count(f"configurable-http-proxy (pid {before}) died") == 1
    assert health(recovering)[0] == 200


@pytest.mark.docker
def test_a_hub_that_keeps_dying_makes_health_say_so_then_recovers(recovering, session):
    kills = 0
    looping = ""
    while kills < 3:
        wait_until(lambda: health(recovering)[0] == 200, 40, "the hub back before a kill")
        os.kill(hub_pid(recovering), signal.SIGKILL)
        kills += 1

        def in_loop() -> bool:
            nonlocal looping
            code, body = health(recovering)
            found = [c for c in body.get("checks", []) if c.get("message", "").startswith(HUB)]
            looping = found[0]["message"] if found else ""
            return code == 503 and bool(looping)

        def back_or_looping() -> bool:
            return in_loop() or (health(recovering)[0] == 200 and alive(hub_pid(recovering)))

        wait_until(back_or_looping, 40, "the hub back, or a crash loop reported")
        if looping:
            break
    assert looping, "three deaths within 30 s did not make /health say so"
    assert re.fullmatch(
        r"JupyterHub died 3 times within 30 s; binderbox waits 30 s before it starts it "
        r"again \(see .*jupyterhub\.log\)\.",
        looping,
    ), looping
    # Backed off: the hub stays down for a while instead of being started at full speed.
    dead = hub_pid(recovering)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert not alive(dead) and hub_pid(recovering) == dead
        assert health(recovering)[0] == 503
        time.sleep(0.5)
    # Then it is started again, and once up for a whole window /health is well again.
    wait_until(lambda: health(recovering)[0] == 200, 90, "the hub back after the back-off")
    wait_until(lambda: answers(session), 30, "the session answering after the back-off")


# ---------- serve itself killed ----------


def slow_repo(git_server, tmp: Path) -> str:
    work = tmp / "slowbuild"
    work.mkdir()
    (work / "requirements.txt").write_text("six==1.16.0\n")
    (work / "postBuild").write_text("#!/bin/sh\necho slow-build-started\nsleep 20\n")
    (work / "postBuild").chmod(0o755)
    commit_all(work)
    return git_server.publish(work, "slowbuild.git")


def our_hooks(chain: str, owner: str) -> list[str]:
    shown = subprocess.run(["iptables", "-w", "-S", chain], capture_output=True, text=True)
    return [line for line in shown.stdout.splitlines() if f"binderbox-{owner}" in line]


def builds_of(served: Served, repo_url: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(state_dir(served) / SQLITE_FILE) as db:
        return db.execute(
            "SELECT id, status, message FROM builds WHERE repo_url = ? ORDER BY started",
            (repo_url,),
        ).fetchall()


class Stream(threading.Thread):
    """A /build stream read in the background, its events kept as they come."""

    def __init__(self, served: Served, path: str) -> None:
        super().__init__(daemon=True)
        self.served, self.path = served, path
        self.events: list[dict] = []
        self.error: Exception | None = None

    def run(self) -> None:
        import json

        try:
            with requests.get(
                self.served.url + self.path,
                headers={"Accept": "text/event-stream"},
                stream=True,
                timeout=120,
            ) as response:
                for line in response.iter_lines(decode_unicode=True):
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
        except requests.RequestException as error:  # serve was killed under it
            self.error = error

    def saw(self, phase: str, text: str = "") -> bool:
        return any(e["phase"] == phase and text in e.get("message", "") for e in self.events)


@pytest.mark.docker
def test_serve_killed_mid_build_and_launch_starts_again_with_nothing_lost(
    recovering, session, git_server, tmp_path
):
    served = recovering
    owner = hub_id_for(state_dir(served).resolve())
    finished = builds_of(served, session["repo_url"])
    assert finished and all(status == "success" for _, status, _ in finished)
    finished_log = requests.get(f"{served.url}/logs/{finished[0][0]}", timeout=10).text

    slow = slow_repo(git_server, tmp_path)
    slow_path = f"/build/git/{quote(slow, safe='')}/main"
    building = Stream(served, slow_path)
    launching = Stream(served, session["spec"])
    building.start()
    wait_until(lambda: building.saw("building", "slow-build-started"), 120, "the slow build")
    launching.start()
    wait_until(lambda: launching.saw("launching"), 60, "a launch under way")
    served.process.send_signal(signal.SIGKILL)
    served.process.wait(timeout=10)

    # The hub is not serve's to take down with it: it lives on, and so do the sessions.
    assert answers(session)
    hub_before = hub_pid(served)
    assert alive(hub_before)

    # What a kill -9 leaves for the next start to put right: the build firewall's hook
    # still in place, one more stale hook of ours, and the build limits changed.
    docker_client = docker.from_env()
    session_bridge = bridge_name(docker_client.networks.get("binderbox-sessions").attrs)
    guarded = firewall_possible()
    if guarded:
        assert len(our_hooks("DOCKER-USER", owner)) == 2  # sessions' bridge and docker0
        subprocess.run(
            [
                "iptables", "-w", "-I", "DOCKER-USER", "-i", session_bridge,
                "-m", "comment", "--comment", f"binderbox-{owner}",
                "-j", "BINDERBOX-SESSIONS",
            ],
            check=True,
        )  # fmt: skip
        assert len(our_hooks("DOCKER-USER", owner)) == 3
    files = limit_files(CGROUP_ROOT) if os.geteuid() == 0 else None
    if files is not None:
        files.pids.write_text(files.unlimited_pids)  # looser, so no other build suffers

    again = start_serve(served.env, served.log, served.prefix)
    served.process = again.process  # the module's fixture stops this one
    # The orphaned hub was stopped and a new one adopted the sessions.
    assert not alive(hub_before)
    assert hub_pid(served) != hub_before
    took_over = f"JupyterHub pid {hub_before}, left running by a binderbox that was killed"
    assert said(served).count(took_over) == 1
    wait_until(lambda: answers(session), 30, "the session answering after the new start")

    # The build under way is failed with a message; the finished one and its log are kept.
    slow_builds = builds_of(served, slow)
    assert len(slow_builds) == 1
    build_id, status, message = slow_builds[0]
    assert status == "failed"
    assert message == "binderbox was restarted while this build ran; launch again."
    shown = requests.get(f"{served.url}/logs/{build_id}", timeout=10).text
    assert "status: failed (binderbox was restarted" in shown
    assert "slow-build-started" in shown
    assert builds_of(served, session["repo_url"]) == finished
    assert requests.get(f"{served.url}/logs/{finished[0][0]}", timeout=10).text == finished_log

    # The firewall and limits are as the settings say, once each.
    if guarded:
        hooks = our_hooks("DOCKER-USER", owner)
        assert len(hooks) == 2, hooks
        assert len([h for h in hooks if f"-i {session_bridge} " in h]) == 1
        assert len(our_hooks("INPUT", owner)) == 2
    if files is not None:
        assert files.pids.read_text().strip() != files.unlimited_pids

    # No stuck queue entry: the interrupted repository builds afresh and launches.
    relaunched = served.stream(slow_path)
    assert relaunched[-1]["phase"] == "ready", relaunched[-1]
    assert answers(relaunched[-1])
    assert health(served)[0] == 200


# ---------- dockerd restarted (only when asked: it stops every other dockerd user) ----------


def host_dockerd() -> tuple[int, list[str]]:
    """This machine's dockerd (in our mount namespace, not a Docker-in-Docker node)."""
    ours = os.readlink("/proc/self/ns/mnt")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if Path(cmdline[0].decode()).name != "dockerd":
                continue
            if os.readlink(proc / "ns/mnt") != ours:
                continue
        except (OSError, IndexError):
            continue
        return int(proc.name), [part.decode() for part in cmdline if part]
    raise AssertionError("no dockerd runs on this machine")


@pytest.mark.docker
@pytest.mark.dockerd_restart
@pytest.mark.skipif(
    os.environ.get("BINDERBOX_TEST_RESTART_DOCKERD") != "1",
    reason="restarts this machine's dockerd: set BINDERBOX_TEST_RESTART_DOCKERD=1 when "
    "nothing else uses it",
)
def test_dockerd_restarted_health_says_so_and_recovers(recovering, session):
    served = recovering
    owner = hub_id_for(state_dir(served).resolve())
    pid, command = host_dockerd()
    os.kill(pid, signal.SIGTERM)
    # dockerd stops its containers first (10 s each at most, in parallel).
    wait_until(lambda: not alive(pid), 120, "dockerd stopping")
    restarted = False
    try:
        wait_until(lambda: health(served)[0] == 503, 20, "/health saying dockerd is down")
        body = health(served)[1]
        docker_check = next(c for c in body["checks"] if c["service"] == "Docker")
        assert not docker_check["ok"] and "dockerd" in docker_check["message"]
        # A dockerd that comes back with its chains flushed (as after a reboot's iptables
        # restore): binderbox must put its hooks back by itself.
        if firewall_possible_without_dockerd():
            for line in our_hooks("DOCKER-USER", owner):
                subprocess.run(["iptables", "-w", *line.replace("-A", "-D", 1).split()])
            assert our_hooks("DOCKER-USER", owner) == []
        # Started again as the bootstrap script starts it: its own session, logging to
        # the same file.
        with open("/var/log/binderbox-dockerd.log", "ab") as log:
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        restarted = True
        wait_until(lambda: _docker_answers(), 120, "dockerd answering again")
        wait_until(lambda: health(served)[0] == 200, 60, "/health well again")
        wait_until(lambda: "dockerd answers again" in said(served), 30, "serve noticing")
        assert said(served).count("dockerd does not answer") == 1
        assert metric(served, "binderbox_restarts_total", "dockerd") == 1
        if firewall_possible():
            wait_until(lambda: len(our_hooks("DOCKER-USER", owner)) == 2, 30, "the hooks put back")
        # Launches work again (sessions stopped with dockerd: containers do not survive).
        again = served.stream(session["spec"])
        assert again[-1]["phase"] == "ready", again[-1]
        assert answers(again[-1])
    finally:
        if not restarted:
            with open("/var/log/binderbox-dockerd.log", "ab") as log:
                subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)


def firewall_possible_without_dockerd() -> bool:
    shown = subprocess.run(["iptables", "-w", "-S"], capture_output=True)
    return os.geteuid() == 0 and shown.returncode == 0


def _docker_answers() -> bool:
    try:
        return bool(docker.from_env(timeout=3).ping())
    except Exception:
        return False
