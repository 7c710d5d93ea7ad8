"""The web pages in a real browser: Debian's chromium driven by Playwright, against the
service under uvicorn (build_only) and repositories served by a git daemon."""

from __future__ import annotations

import re
import socket
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from tests.conftest import free_port, shot
from tests.test_service_build import Service, build_path, building_service, served_repo

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect


@pytest.fixture(scope="module")
def plain_service():
    svc = Service()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def build_service(base_image, built_images, tmp_path_factory):
    events = str(tmp_path_factory.mktemp("events") / "events.jsonl")
    with building_service(built_images, "pages", launch_events_file=events) as svc:
        yield svc


@pytest.fixture(scope="module")
def good_repo(git_server, tmp_path_factory):
    files = {
        "a.ipynb": "{}",
        "postBuild": "#!/bin/sh\nprintf '\\033[32mgreen line\\033[0m\\n'\nsleep 2\necho done\n",
    }
    return served_repo(git_server, tmp_path_factory.mktemp("good"), files, "pages-good")


@pytest.fixture(scope="module")
def pasted_repo(git_server, tmp_path_factory):
    """A repository of its own for the paste test, so good_repo's first build stays a build."""
    files = {"a.ipynb": "{}", "requirements.txt": ""}
    return served_repo(git_server, tmp_path_factory.mktemp("pasted"), files, "pages-pasted")


def launch_path(url: str, ref: str = "main", query: str = "build_only=true") -> str:
    return f"/v2/git/{quote(url, safe='')}/{ref}?{query}"


def test_home_page_detects_the_provider_and_builds_the_share_snippets(plain_service, page):
    page.goto(plain_service.url + "/")
    expect(page).to_have_title(re.compile("binderbox"))
    og = page.locator('meta[property="og:title"]')
    assert "binderbox" in og.get_attribute("content")
    assert page.locator('meta[property="og:description"]').get_attribute("content")
    options = page.locator("#provider option").evaluate_all("els => els.map(e => e.value)")
    for name in ["gh", "gl", "gist", "git", "zenodo", "figshare", "hydroshare", "dataverse"]:
        assert name in options
    expect(page.locator("#launch")).to_be_disabled()

    page.select_option("#provider", "git")
    page.get_by_label("Arbitrary git repository URL").fill("")
    page.locator("#repo").press_sequentially("https://github.com/binder-examples/requirements")
    expect(page.locator("#provider")).to_have_value("gh")
    expect(page.locator("#repo")).to_have_value("binder-examples/requirements")
    link = f"{plain_service.url}/v2/gh/binder-examples/requirements/HEAD"
    expect(page.locator("#share-url")).to_have_value(link)
    badge = f"[![Binder]({plain_service.url}/badge_logo.svg)]({link})"
    expect(page.locator("#badge-md")).to_have_value(badge)
    expect(page.locator("#badge-rst")).to_have_value(re.compile(f":target: {re.escape(link)}$"))

    page.get_by_label("Git ref (branch, tag, or commit)").fill("main")
    page.get_by_label("Path to open").fill("index.ipynb")
    expect(page.locator("#share-url")).to_have_value(
        f"{plain_service.url}/v2/gh/binder-examples/requirements/main?labpath=index.ipynb"
    )
    page.get_by_label("The path is a").select_option("notebook")
    expect(page.locator("#share-url")).to_have_value(
        re.compile(r"/main\?urlpath=tree%2Findex\.ipynb$")
    )
    page.get_by_label("The path is a").select_option("url")
    expect(page.locator("#share-url")).to_have_value(re.compile(r"/main\?urlpath=index\.ipynb$"))
    shot(page, "home", full_page=True)

    # Other addresses: GitLab, a Gist and a DOI.
    for text, provider, repo in [
        ("https://gitlab.com/group/sub/project", "gl", "group/sub/project"),
        ("https://gist.github.com/someone/0123abcd", "gist", "someone/0123abcd"),
        ("10.5281/zenodo.3242074", "zenodo", "10.5281/zenodo.3242074"),
    ]:
        page.locator("#repo").fill(text)
        expect(page.locator("#provider")).to_have_value(provider)
        expect(page.locator("#repo")).to_have_value(repo)
    expect(page.locator("#share-url")).to_have_value(
        re.compile(r"/v2/zenodo/10\.5281/zenodo\.3242074\?urlpath=")
    )

    # The copy buttons put the snippet on the clipboard.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy the Markdown badge").click()
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.locator("#badge-md").input_value()
    assert copied.startswith("[![Binder](") and "/v2/zenodo/" in copied

    # Keyboard only: Enter in the form launches.
    page.get_by_label("Path to open").fill("")
    page.locator("#repo").fill("https://github.com/org/repo")
    page.locator("#repo").press("Enter")
    page.wait_for_url(re.compile(r"/v2/gh/org/repo/main$"))

    phone = page.context.browser.new_context(viewport={"width": 390, "height": 844})
    small = phone.new_page()
    small.goto(plain_service.url + "/?provider=gh&repo=org%2Frepo")
    expect(small.locator("#share-url")).to_have_value(re.compile("/v2/gh/org/repo/HEAD$"))
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "the page scrolls sideways at phone width"
    shot(small, "home-phone", full_page=True)
    phone.close()


# Addresses on git hosts other than GitHub, GitLab and Gist: each selects "Git repository".
OTHER_GIT_ADDRESSES = [
    "git://git.example.org/org/repo.git",
    "https://codeberg.org/org/repo",
    "https://git.example.org/path/to/repo.git",
    "http://git.example.org/org/repo",
    "https://gitlab.example.org/group/sub/project",
]


def paste(page, selector: str, text: str) -> None:
    """Paste ``text`` into an empty field through the clipboard, as a person would."""
    page.locator(selector).fill("")
    page.evaluate("text => navigator.clipboard.writeText(text)", text)
    page.locator(selector).focus()
    page.keyboard.press("Control+V")


@pytest.mark.parametrize("start", ["gh", "gl", "zenodo"])
def test_a_pasted_address_on_another_git_host_selects_git_repository(plain_service, page, start):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(plain_service.url + "/")
    for address in OTHER_GIT_ADDRESSES:
        page.select_option("#provider", start)
        paste(page, "#repo", address)
        expect(page.locator("#provider")).to_have_value("git")
        expect(page.locator("#repo")).to_have_value(address)
        expect(page.locator("#repo-label")).to_have_text("Arbitrary git repository URL")
        link = f"{plain_service.url}/v2/git/{quote(address, safe='')}/HEAD"
        expect(page.locator("#share-url")).to_have_value(link)
    # Half-typed GitHub addresses do not pass for another git host on the way.
    page.select_option("#provider", "gh")
    page.locator("#repo").fill("")
    page.locator("#repo").press_sequentially("https://github.com/org")
    expect(page.locator("#provider")).to_have_value("gh")
    page.locator("#repo").press_sequentially("/repo")
    expect(page.locator("#provider")).to_have_value("gh")
    expect(page.locator("#repo")).to_have_value("org/repo")


def test_a_pasted_git_address_launches(build_service, pasted_repo, page):
    """The link the form makes for a git:// address is a launch the service understands."""
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(build_service.url + "/")
    expect(page.locator("#provider")).to_have_value("gh")
    paste(page, "#repo", pasted_repo)
    expect(page.locator("#provider")).to_have_value("git")
    page.get_by_label("Git ref (branch, tag, or commit)").fill("main")
    link = page.locator("#share-url").input_value()
    assert link == f"{build_service.url}{launch_path(pasted_repo, query='')}".rstrip("?")
    page.goto(link + "?build_only=true")
    expect(page.locator("h1")).to_have_text(f"Launching {pasted_repo}")
    expect(page.locator("#state")).to_contain_text("Built", timeout=600_000)


def test_the_launch_page_shows_a_build_only_build(build_service, good_repo, page):
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/build/" in r.url else None)
    page.goto(build_service.url + launch_path(good_repo))
    expect(page.locator("h1")).to_have_text(f"Launching {good_repo}")
    expect(page.locator("#log")).to_contain_text("green line", timeout=600_000)
    green = page.locator("#log span.ansi-fg-2", has_text="green line")
    expect(green).to_have_count(1)
    expect(page.locator('[data-phase="building"]')).to_have_class("current")
    expect(page).to_have_title(re.compile("^Building"))
    shot(page, "launch-building", full_page=True)
    expect(page.locator("#state")).to_contain_text("Built", timeout=600_000)
    expect(page).to_have_title(re.compile("^Built"))
    expect(page.locator('[data-phase="ready"]')).to_have_class("done")
    expect(page.locator('[data-phase="waiting"]')).to_have_class("skipped")  # a slot was free
    expect(page.locator("#log")).to_contain_text("done")
    assert "/v2/git/" in page.url  # no redirect in build_only mode
    assert page.locator("#favicon").get_attribute("href").startswith("data:image/svg+xml")
    shot(page, "launch-built", full_page=True)
    page.wait_for_timeout(4000)  # an event stream left open would reconnect in ~3 s
    assert len(streams) == 1, streams
    assert "build_token=" in streams[0]

    # Again: the image is cached.
    page.goto(build_service.url + launch_path(good_repo))
    expect(page.locator("#state")).to_contain_text("Built", timeout=120_000)
    expect(page.locator("#log")).to_contain_text("Found a built image")
    expect(page.locator('[data-phase="building"]')).to_have_class("skipped")


def test_the_launch_page_explains_a_failure(build_service, git_server, tmp_path, page):
    files = {"postBuild": "#!/bin/sh\necho about-to-fail\nexit 4\n"}
    url = served_repo(git_server, tmp_path, files, "pages-fail")
    page.goto(build_service.url + launch_path(url))
    failure = page.locator("#failure")
    expect(failure).to_be_visible(timeout=600_000)
    expect(page.locator("#reason")).to_contain_text("postBuild")
    expect(page.locator("#reason")).to_contain_text("code 4")
    expect(page.locator("#reason")).not_to_contain_text("The whole log")
    expect(page.locator("#log")).to_contain_text("about-to-fail")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    expect(page).to_have_title(re.compile("^Failed"))
    log_link = page.get_by_role("link", name="Open the full build log")
    expect(log_link).to_be_visible()
    href = log_link.get_attribute("href")
    assert re.search(r"/logs/\w+$", href)
    response = requests.get(href, timeout=10)
    assert response.status_code == 200
    assert "about-to-fail" in response.text
    shot(page, "launch-failed", full_page=True)

    # An unknown ref fails before any build: no log link, still a reason.
    page.goto(build_service.url + launch_path(url, ref="no-such-branch"))
    expect(page.locator("#reason")).to_contain_text("no-such-branch", timeout=60_000)
    expect(page.get_by_role("link", name="Open the full build log")).to_be_hidden()
    page.get_by_role("button", name="Retry").click()
    expect(page.locator("#reason")).to_contain_text("no-such-branch", timeout=60_000)


def test_the_status_page(build_service, good_repo, page):
    events, _ = build_service.events(build_path(good_repo, build_only="true"))
    assert events[-1]["phase"] == "ready"
    page.goto(build_service.url + "/status")
    expect(page.locator("#health")).to_have_text("ok")
    expect(page.locator(".checks")).to_contain_text("Docker: ok")
    expect(page.locator("#builds-running")).to_have_text("0")
    row = page.locator("#launches tbody tr").first
    expect(row).to_contain_text(good_repo)
    expect(row).to_contain_text("success")
    shot(page, "status", full_page=True)


def test_launch_page_escapes_the_spec(plain_service, page):
    page.goto(plain_service.url + "/v2/gh/x/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E/HEAD")
    expect(page.locator("h1")).to_contain_text("<img src=x onerror=alert(1)>")
    assert page.locator("main img").count() == 0


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``port`` whose connections the test can cut,
    as a flaky network or a restarted load balancer would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.live += [client, upstream]
            for a, b in [(client, upstream), (upstream, client)]:
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every open connection, both ways."""
        with self.lock:
            live, self.live = self.live, []
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def builds_of(service: Service, repo_url: str) -> int:
    with sqlite3.connect(Path(service.state_dir) / "binderbox.sqlite") as db:
        return db.execute("SELECT count(*) FROM builds WHERE repo_url = ?", (repo_url,)).fetchone()[
            0
        ]


def test_a_dropped_event_stream_reconnects_to_the_same_build(
    build_service, git_server, tmp_path, page
):
    files = {
        "postBuild": "#!/bin/sh\necho before-the-cut\nsleep 12\necho after-the-cut\n",
    }
    url = served_repo(git_server, tmp_path, files, "pages-reconnect")
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/build/" in r.url else None)
    relay = Relay(build_service.port)
    try:
        page.goto(relay.url + launch_path(url))
        expect(page.locator("#log")).to_contain_text("before-the-cut", timeout=600_000)
        relay.cut()
        expect(page.locator("#state")).to_contain_text("Built", timeout=600_000)
    finally:
        relay.close()
    assert len(streams) >= 2, "the page did not reconnect"
    # The second stream joined the running build and replayed its log from the start,
    # once: no second build, no line shown twice.
    assert builds_of(build_service, url) == 1
    log = page.locator("#log").inner_text()
    assert log.count("before-the-cut") == 1, log
    assert "after-the-cut" in log
    expect(page).to_have_title(re.compile("^Built"))


def test_the_pages_work_from_the_keyboard_alone(
    plain_service, build_service, git_server, tmp_path, page
):
    page.goto(plain_service.url + "/")
    # From the top of the page: Tab through every control, type the repository where the
    # focus lands in its field, go on to Launch and press it. Each stop shows its focus.
    reached: list[str] = []
    for _ in range(40):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => { const e = document.activeElement;"
            " return e === document.body ? 'body' : e.id || e.textContent.trim(); }"
        )
        visible = page.evaluate(
            "() => { const s = getComputedStyle(document.activeElement);"
            " return s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0; }"
        )
        assert visible, f"no visible focus on {focused} (after {reached})"
        reached.append(focused)
        if focused == "repo":
            page.keyboard.type("https://github.com/org/repo")
            expect(page.locator("#share-url")).to_have_value(re.compile("/v2/gh/org/repo/HEAD$"))
        if focused == "launch":
            break
    assert reached[:5] == ["Skip to content", "binderbox", "Launch", "Status", "Usage"], reached
    assert reached[5:] == ["provider", "repo", "ref", "path", "path-kind", "launch"], reached
    page.keyboard.press("Space")
    page.wait_for_url(re.compile(r"/v2/gh/org/repo/HEAD$"))

    # A failed launch puts the focus on Retry; Enter retries.
    url = served_repo(git_server, tmp_path, {"postBuild": "#!/bin/sh\nexit 3\n"}, "pages-keys")
    page.goto(build_service.url + launch_path(url, ref="no-such-branch"))
    retry = page.get_by_role("button", name="Retry")
    expect(retry).to_be_focused(timeout=60_000)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.locator("#reason")).to_contain_text("no-such-branch", timeout=60_000)


def test_a_shared_launch_link_previews_and_fits_a_phone(build_service, good_repo, browser):
    # Chat apps and social sites read the tags without running scripts.
    link = build_service.url + launch_path(good_repo)
    html = requests.get(link, timeout=10).text
    tags = dict(re.findall(r'<meta (?:property|name)="([^"]+)" content="([^"]*)"', html))
    assert tags["og:title"].startswith("Launching git/") and "pages-good" in tags["og:title"]
    assert "pages-good" in tags["og:description"]
    assert tags["twitter:card"] == "summary"
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    small = phone.new_page()
    for path, name in [(launch_path(good_repo), "launch-phone"), ("/status", "status-phone")]:
        small.goto(build_service.url + path)
        if name == "launch-phone":
            expect(small.locator("#state")).to_contain_text("Built", timeout=600_000)
        width = small.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} scrolls sideways at phone width ({width}px)"
        clipped = small.evaluate(
            "[...document.querySelectorAll('.table-wrap')]"
            ".filter(e => e.scrollWidth > e.clientWidth).length"
        )
        assert clipped == 0, f"a table on {path} is wider than a phone"
        shot(small, name, full_page=True)
    phone.close()


@pytest.fixture(scope="module")
def one_build_service(base_image, built_images):
    """One build at a time: a second repository waits in the queue."""
    with building_service(built_images, "pages1", build_concurrency=1) as svc:
        yield svc


def test_the_log_follows_until_the_reader_scrolls_up_and_a_queued_launch_shows_its_place(
    one_build_service, git_server, tmp_path, browser
):
    long_build = served_repo(
        git_server,
        tmp_path,
        {
            "postBuild": "#!/bin/sh\n"
            "for i in $(seq 1 200); do echo first-part-$i; done\n"
            "sleep 6\n"
            "for i in $(seq 1 200); do echo second-part-$i; done\n"
            "sleep 6\n"
            "for i in $(seq 1 200); do echo third-part-$i; done\n"
        },
        "pages-long",
    )
    queued = served_repo(git_server, tmp_path, {"a.ipynb": "{}"}, "pages-queued")
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        reader = context.new_page()
        reader.goto(one_build_service.url + launch_path(long_build))
        log = reader.locator("#log")
        expect(log).to_contain_text("first-part-200", timeout=600_000)

        # The second repository waits for the only build slot, and says so.
        waiting = context.new_page()
        waiting.goto(one_build_service.url + launch_path(queued))
        expect(waiting.locator("#state")).to_contain_text("position 1 in the queue")
        expect(waiting).to_have_title(re.compile(r"^Queued \(1\)"))
        expect(waiting.locator('[data-phase="waiting"]')).to_have_class("current")
        shot(waiting, "launch-queued", full_page=True)
        # The status page lists both, with their state and a link to the live log.
        status = context.new_page()
        status.goto(one_build_service.url + "/status")
        expect(status.locator("#builds-running")).to_have_text("1")
        expect(status.locator("#builds-waiting")).to_have_text("1")
        rows = status.locator("#builds tbody tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text(long_build)
        expect(rows.nth(0)).to_contain_text("building")
        expect(rows.nth(1)).to_contain_text(queued)
        expect(rows.nth(1)).to_contain_text("waiting (1)")
        live_log = rows.nth(0).get_by_role("link", name="log").get_attribute("href")
        assert "first-part-200" in requests.get(one_build_service.url + live_log, timeout=10).text
        shot(status, "status-builds", full_page=True)
        status.close()

        # Following: the newest line is in view.
        at_bottom = "e => e.scrollTop + e.clientHeight >= e.scrollHeight - 12"
        assert log.evaluate(at_bottom)
        expect(reader.locator("#log-paused")).to_be_hidden()
        # The reader scrolls up: new lines no longer pull the log down.
        log.hover()
        reader.mouse.wheel(0, -100_000)
        expect(reader.locator("#log-paused")).to_be_visible()
        top = log.evaluate("e => e.scrollTop")
        expect(log).to_contain_text("second-part-200", timeout=120_000)
        assert log.evaluate("e => e.scrollTop") == top
        assert not log.evaluate(at_bottom)
        # Back at the bottom, it follows again.
        reader.mouse.wheel(0, 1_000_000)
        expect(reader.locator("#log-paused")).to_be_hidden()
        expect(log).to_contain_text("third-part-200", timeout=120_000)
        assert log.evaluate(at_bottom)
        expect(reader.locator("#state")).to_contain_text("Built", timeout=600_000)

        # The queued build starts when the slot frees, and ends.
        expect(waiting.locator("#state")).to_contain_text("Built", timeout=600_000)
        assert waiting.locator('[data-phase="waiting"]').get_attribute("class") == "done"
    finally:
        context.close()
