"""Nothing sensitive on public pages: addresses with user-info are refused before they are
stored or shown, and links come from the configured address, never from a request's Host
header nor from text a build printed.

The real tests run the service (build only) on 127.0.0.1 against a git daemon there, and
send requests carrying ``Host: evil.example``; no request leaves 127.0.0.1."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from tests.test_service_build import build_path, building_service, served_repo

from binderbox.config import Settings
from binderbox.errors import UsageError
from binderbox.service.app import _reason_html
from binderbox.service.public import base_url, is_loopback, is_public
from binderbox.service.specs import (
    SpecError,
    has_userinfo,
    parse_spec,
    without_userinfo,
)

# --- pure ------------------------------------------------------------------------------


def test_which_addresses_are_this_machine_only() -> None:
    for host in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST."]:
        assert is_loopback(host), host
    for host in ["0.0.0.0", "::", "", "10.1.2.3", "fd00::2", "binder.example.org"]:
        assert not is_loopback(host), host
    assert not is_public(Settings())
    assert is_public(Settings(service_host="0.0.0.0"))
    # Behind a reverse proxy: binderbox listens on loopback, people come from elsewhere.
    assert is_public(Settings(public_url="https://binder.example.org/"))
    assert is_public(Settings(sessions_public_url="https://hub.example.org/"))
    assert not is_public(Settings(public_url="http://localhost:8585/"))


def test_links_start_with_the_configured_address() -> None:
    assert base_url(Settings()) == "http://127.0.0.1:8585/"
    assert base_url(Settings(service_port=9000)) == "http://127.0.0.1:9000/"
    assert base_url(Settings(service_host="::1")) == "http://[::1]:8585/"
    assert base_url(Settings(public_url="https://mybinder.org")) == "https://mybinder.org/"
    assert base_url(Settings(service_host="0.0.0.0")).startswith("http://")
    for bad in ["ftp://x/", "https://user:pw@binder.example.org/", 'https://x/"onload']:
        with pytest.raises(UsageError, match="public_url"):
            Settings().with_overrides(public_url=bad)


@pytest.mark.parametrize(
    "spec",
    [
        quote("https://user:secret@example.org/r.git", safe="") + "/main",
        quote("git://token@example.org/r.git", safe="") + "/HEAD",
        quote(quote("https://u:secret@example.org/r", safe=""), safe="") + "/main",
        "https://u:secret@example.org/r/main",
        "git@example.org:org/repo.git/main",
    ],
)
def test_addresses_with_user_info_are_refused(spec: str) -> None:
    assert has_userinfo(spec)
    with pytest.raises(SpecError, match="user name or password"):
        parse_spec("git", spec)
    cleaned = without_userinfo(spec)
    assert "secret" not in cleaned and "token" not in cleaned and "@" not in cleaned


def test_addresses_without_user_info_pass() -> None:
    for spec in [
        quote("https://example.org/a@b/r.git", safe="") + "/main",  # "@" in the path
        quote("https://example.org/r.git", safe="") + "/v1",
    ]:
        assert not has_userinfo(spec)
        assert without_userinfo(spec) == spec
        assert parse_spec("git", spec).repo_url.startswith("https://example.org/")
    # gl specs cannot hold user-info at all: their path is names only.
    with pytest.raises(SpecError):
        parse_spec("gl", quote("u:p@gitlab.com/g/p", safe="") + "/main")


def test_only_the_services_own_log_link_is_a_link() -> None:
    ours = _reason_html("postBuild failed. The whole log: https://binder.example.org/logs/ab12")
    assert ours == 'postBuild failed. <a href="/logs/ab12">The whole log</a>'
    printed = "Step failed: see http://evil.example/x"
    assert "<a" not in _reason_html(printed) and "evil.example" in _reason_html(printed)
    for text in [
        "x The whole log: http://evil.example/x",
        "x The whole log: http://evil.example/logs/ab12/../../x",
        'x The whole log: /logs/ab"><script>',
    ]:
        assert "<a" not in _reason_html(text), text
    # Only the closing log link counts; one a build printed before it stays text.
    both = "echo The whole log: http://evil.example/y The whole log: http://h/logs/cd34"
    rendered = _reason_html(both)
    assert rendered.count("<a") == 1 and 'href="/logs/cd34"' in rendered


# --- real: the service, a git daemon, requests with a hostile Host header -------------

EVIL = {"Host": "evil.example"}


def stream(url: str, headers: dict[str, str] | None = None) -> list[dict]:
    response = requests.get(
        url, headers={"Accept": "text/event-stream", **(headers or {})}, stream=True, timeout=600
    )
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if events[-1]["phase"] in {"ready", "failed"}:
                break
    response.close()
    return events


def hrefs(page: str) -> list[str]:
    return re.findall(r'href="([^"]*)"', page)


@pytest.mark.docker
def test_links_never_follow_the_host_header_or_a_builds_text(
    base_image, built_images, git_server, tmp_path: Path
) -> None:
    printed = "see http://evil.example/x The whole log: http://evil.example/logs/abc"
    broken = served_repo(
        git_server,
        tmp_path,
        {"Dockerfile": f"FROM {base_image}\nRUN echo '{printed}' && exit 3\n"},
        "public-broken",
    )
    fine = served_repo(git_server, tmp_path, {"a.txt": "a"}, "public-fine")
    public = "https://binder.example.org/"
    events_file = tmp_path / "events.jsonl"
    with building_service(
        built_images, "public", public_url=public, launch_events_file=str(events_file)
    ) as service:
        failed = stream(service.url + build_path(broken, build_only="true"), EVIL)[-1]
        assert failed["phase"] == "failed"
        assert failed["log_url"].startswith(public + "logs/"), failed
        assert "The whole log: " + failed["log_url"] in failed["message"]
        ready = stream(service.url + build_path(fine, build_only="true"), EVIL)[-1]
        assert ready["phase"] == "ready", ready
        assert ready["binder_launch_host"] == public

        status = requests.get(service.url + "/status", headers=EVIL, timeout=30)
        assert status.status_code == 200
        links = hrefs(status.text)
        assert not [link for link in links if "evil.example" in link], links
        build_id = failed["log_url"].rsplit("/", 1)[1]
        assert f"/logs/{build_id}" in links
        # What the build printed is on the page, as text.
        assert "evil.example/x" in status.text
        launch = requests.get(service.url + "/v2/git/x/main", headers=EVIL, timeout=30)
        assert "evil.example" not in launch.text


@pytest.mark.docker
def test_user_info_is_refused_before_anything_is_stored_or_shown(
    base_image, built_images, git_server, tmp_path: Path
) -> None:
    fine = served_repo(git_server, tmp_path, {"b.txt": "b"}, "public-secret")
    events_file = tmp_path / "events.jsonl"
    with building_service(built_images, "secret", launch_events_file=str(events_file)) as service:
        for url in [
            fine.replace("git://", "git://user:s3cr3t-a@", 1),
            fine.replace("git://", "https://s3cr3t-b@", 1),
        ]:
            events = stream(service.url + build_path(url, build_only="true"))
            assert [e["phase"] for e in events] == ["failed"], events
            assert "user name or password" in events[-1]["message"]
            assert "s3cr3t" not in str(events)
            page = requests.get(
                service.url + "/v2/git/" + quote(url, safe="") + "/main", timeout=30
            )
            # The requester's own page names the repository without it (only its script
            # data repeats the request, so that /build refuses it with the sentence).
            visible = re.sub(r"<script[^>]*>.*?</script>", "", page.text, flags=re.S)
            assert page.status_code == 200 and "s3cr3t" not in visible
            assert "public-secret.git" in visible
        # The address without its user-info still launches.
        assert stream(service.url + build_path(fine, build_only="true"))[-1]["phase"] == "ready"
        status = requests.get(service.url + "/status", timeout=30).text
        assert "user name or password" in status and "s3cr3t" not in status
        stored = b"".join(p.read_bytes() for p in Path(service.state_dir).rglob("*") if p.is_file())
        assert b"s3cr3t" not in stored
        assert "s3cr3t" not in (events_file.read_text() if events_file.exists() else "")
