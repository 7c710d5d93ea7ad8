"""Build nodes: the settings, and how NodeBuilder picks a node (fakes of the nodes' API;
the real builds on Docker-in-Docker nodes are in test_swarm_serve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from binderbox.builder import nodes
from binderbox.builder.nodes import NodeBuilder
from binderbox.config import Settings, build_nodes, load_settings
from binderbox.errors import BinderboxError, UsageError
from binderbox.events import Event


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    return tmp_path


def settings_with(**values: str) -> Settings:
    return load_settings(environ={f"BINDERBOX_{k.upper()}": v for k, v in values.items()})


def test_build_nodes_are_docker_hosts_with_tls_and_a_registry(tls_dir: Path) -> None:
    good = settings_with(
        swarm_build_nodes="tcp://10.0.0.5:2376, tcp://node-b:2376",
        swarm_build_tls_dir=str(tls_dir),
        registry_url="http://127.0.0.1:5000",
    )
    assert build_nodes(good) == ["tcp://10.0.0.5:2376", "tcp://node-b:2376"]
    assert build_nodes(Settings()) == []
    for bad, says in [
        ({"swarm_build_nodes": "unix:///var/run/docker.sock"}, "Docker hosts such as"),
        ({"swarm_build_nodes": "tcp://10.0.0.5"}, "Docker hosts such as"),
        ({"swarm_build_nodes": "tcp://10.0.0.5:2376", "registry_url": ""}, "needs 'registry_url'"),
        ({"swarm_build_tls_dir": ""}, "ca.pem, cert.pem, key.pem missing"),
        ({"swarm_build_tls_dir": str(tls_dir / "nowhere")}, "must name a folder"),
    ]:
        values = {
            "swarm_build_nodes": "tcp://10.0.0.5:2376",
            "swarm_build_tls_dir": str(tls_dir),
            "registry_url": "http://127.0.0.1:5000",
            **bad,
        }
        with pytest.raises(UsageError) as error:
            settings_with(**values)
        assert says in error.value.message, error.value.message


def builder_over(tls_dir: Path, answers: dict[str, str | None], fit=None) -> NodeBuilder:
    settings = settings_with(
        swarm_build_nodes=",".join(answers),
        swarm_build_tls_dir=str(tls_dir),
        registry_url="http://127.0.0.1:5000",
    )
    builder = NodeBuilder(settings, fit) if fit else NodeBuilder(settings)
    return builder


def test_the_least_busy_answering_node_builds(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: dict[str, str | None] = {
        "tcp://a:2376": None,
        "tcp://b:2376": "connection refused",
        "tcp://c:2376": None,
    }
    monkeypatch.setattr(nodes, "_ping", lambda node, fit: answers[node.host] or fit(node.host))
    builder = builder_over(tls_dir, answers)
    said: list[Event] = []
    first = builder._take(said.append)
    second = builder._take(said.append)
    # a is busy with the first build, b does not answer: c takes the second.
    assert (first.host, second.host) == ("tcp://a:2376", "tcp://c:2376")
    assert said[-1].message == "Building on the build node tcp://c:2376."
    with builder._lock:
        builder._busy["tcp://a:2376"] -= 1
    assert builder._take(said.append).host == "tcp://a:2376"


def test_no_fit_node_is_one_sentence_naming_each(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: dict[str, str | None] = {"tcp://a:2376": None, "tcp://b:2376": "no answer"}
    monkeypatch.setattr(nodes, "_ping", lambda node, fit: answers[node.host] or fit(node.host))
    builder = builder_over(
        tls_dir, answers, fit=lambda node_id: "its node guard (the build firewall) is not running"
    )
    with pytest.raises(BinderboxError) as error:
        builder._take(lambda event: None)
    message = error.value.message
    assert message.startswith("No build node answers (tcp://a:2376: its node guard")
    assert "tcp://b:2376: no answer" in message
    assert "\n" not in message
    # Nothing stays counted as busy.
    assert sum(builder._busy.values()) == 0


def test_an_unreachable_node_is_said_in_a_few_words(tls_dir: Path) -> None:
    # A real client against a port nothing listens on.
    node = nodes.BuildNode("tcp://127.0.0.1:9", tls_dir)
    problem = nodes._ping(node, lambda node_id: None)
    assert problem and "\n" not in problem and len(problem) <= 120
