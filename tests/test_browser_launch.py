"""A real launch in a real browser: `binderbox serve` (hub, proxy, dockerd) with a git
daemon on 127.0.0.1, driven by Debian's chromium through Playwright, down to JupyterLab
running a notebook cell, and thebe-core (what Jupyter Book uses) running code from a page
on another origin."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
import requests
from tests.conftest import commit_all, firewall_possible, free_port, shot
from tests.test_serve import Served, serving

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
# Where thebe-core is installed from npm (kept between runs; ignored by git).
NPM_CACHE = ROOT / ".cache-npm" / "thebe"
THEBE_VERSION = "0.5.0"
LAUNCH_TIMEOUT = 900_000  # ms: a first build of the repository may take minutes

NOTEBOOK = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    },
    "cells": [
        {
            "cell_type": "code",
            "id": "c0ffee00",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": ["print(6*7)"],
        }
    ],
}


class StaticSite:
    """A directory served over HTTP on 127.0.0.1 from a thread: another origin."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(QuietHandler, directory=str(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[StaticSite]:
    site = StaticSite(tmp_path_factory.mktemp("site"))
    yield site
    site.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, base_image, site) -> Iterator[Served]:
    # The thebe page is on another origin: it reads the event stream and then talks to the
    # session's Jupyter server (REST and websockets) directly.
    with serving(
        tmp_path_factory,
        "browser",
        BINDERBOX_PER_REPO_QUOTA="10",
        BINDERBOX_CORS_ALLOW_ORIGIN=site.url,
        BINDERBOX_SESSION_ALLOW_ORIGIN=site.url,
    ) as process:
        yield process


@pytest.fixture(scope="module")
def notebook_repo(git_server, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("repo") / "browser-notebook"
    work.mkdir()
    (work / "requirements.txt").write_text("six\n")
    (work / "index.ipynb").write_text(json.dumps(NOTEBOOK, indent=1) + "\n")
    commit_all(work)
    return git_server.publish(work, "browser-notebook.git")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.console: list[str] = []
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
    yield page
    context.close()


def test_launch_from_the_home_page_runs_the_notebook_in_jupyterlab(served, notebook_repo, page):
    began = time.monotonic()
    page.goto(served.url + "/")
    page.select_option("#provider", "git")
    page.locator("#repo").fill(notebook_repo)
    page.locator("#ref").fill("main")
    page.locator("#path").fill("index.ipynb")
    page.locator("#path-kind").select_option("file")
    expect(page.locator("#share-url")).to_have_value(
        f"{served.url}/v2/git/{quote(notebook_repo, safe='')}/main?labpath=index.ipynb"
    )
    page.locator("#launch").click()
    page.wait_for_url(re.compile(r"/v2/git/"))

    lab = re.compile(r"^http://127\.0\.0\.1:\d+/user/[^/]+/lab/tree/index\.ipynb")
    page.wait_for_url(lab, timeout=LAUNCH_TIMEOUT)
    launched = time.monotonic() - began
    assert urlparse(page.url).port == int(served.env["BINDERBOX_SESSIONS_PORT"])

    # JupyterLab loads with the notebook open; its one cell runs and prints 42.
    tab = page.locator(".lm-TabBar-tab", has_text="index.ipynb")
    expect(tab).to_be_visible(timeout=120_000)
    cell = page.locator(".jp-NotebookPanel:visible .jp-CodeCell").first
    expect(cell.locator(".jp-InputArea")).to_contain_text("print(6*7)", timeout=60_000)
    # The notebook's kernel has started and is connected (the status bar says so).
    status = page.get_by_role("button", name=re.compile(r"^Python 3.*\| Idle$"))
    expect(status).to_be_visible(timeout=120_000)
    output = cell.locator(".jp-OutputArea-output")
    deadline = time.monotonic() + 120
    key, tries = "Shift+Enter", 0
    while True:
        tries += 1
        # JupyterLab may still be attaching the kernel to the notebook and drop the first
        # run: the prompt then stays "[ ]". Run the cell again in place until it prints.
        cell.locator(".cm-content").click()
        page.keyboard.press(key)
        try:
            expect(output).to_have_text(re.compile(r"^\s*42\s*$"), timeout=15_000)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                shot(page, "jupyterlab")
                raise
            key = "Control+Enter"
    expect(cell.locator(".jp-InputPrompt")).to_contain_text(re.compile(r"\[\d+\]"))
    # A throwaway session does not ask whether to fetch Jupyter news.
    expect(page.get_by_text("Jupyter news")).to_have_count(0)
    shot(page, "jupyterlab")
    print(f"home page to JupyterLab: {launched:.1f} s, to 42: {time.monotonic() - began:.1f} s")
    print(f"cell runs needed: {tries}")


@pytest.mark.parametrize(
    ("query", "path"),
    [
        # mybinder.org's form and badges (JupyterLab with the file open)
        ("labpath=index.ipynb", "/lab/tree/index.ipynb"),
        # Jupyter Book launch buttons: JupyterLab, and the classic interface (Notebook 7
        # opens a notebook given to /tree at /notebooks)
        ("urlpath=lab/tree/index.ipynb", "/lab/tree/index.ipynb"),
        ("urlpath=tree/index.ipynb", "/notebooks/index.ipynb"),
        # older links
        ("filepath=index.ipynb", "/notebooks/index.ipynb"),
        ("urlpath=tree", "/tree"),
    ],
)
def test_a_launch_link_lands_on_its_path(served, notebook_repo, page, query, path):
    began = time.monotonic()
    page.goto(f"{served.url}/v2/git/{quote(notebook_repo, safe='')}/main?{query}")
    session = re.compile(r"^http://127\.0\.0\.1:\d+/user/")
    page.wait_for_url(session, timeout=LAUNCH_TIMEOUT)
    page.wait_for_url(re.compile(re.escape(path) + r"/?(\?.*)?$"), timeout=60_000)
    page.wait_for_load_state()
    landed = urlparse(page.url).path
    assert re.fullmatch(r"/user/[^/]+" + re.escape(path) + "/?", landed), page.url
    # Not an error page: the notebook is open with its cell, or the file browser lists it.
    # (JupyterLab keeps hidden copies of names in its layout: look at visible ones only.)
    if path.endswith("index.ipynb"):
        shown = page.get_by_text("print(6*7)").filter(visible=True).first
    else:
        shown = page.get_by_text("index.ipynb").filter(visible=True).first
    expect(shown).to_be_visible(timeout=120_000)
    shot(page, "link-" + query.replace("/", "-").replace("=", "-"))
    print(f"{query}: {landed} after {time.monotonic() - began:.1f} s")


def test_a_failing_repository_shows_the_reason_and_the_log(served, git_server, tmp_path, page):
    work = tmp_path / "browser-broken"
    work.mkdir()
    (work / "requirements.txt").write_text("six\n")
    (work / "postBuild").write_text("#!/bin/sh\necho setting-things-up\nexit 7\n")
    commit_all(work)
    url = git_server.publish(work, "browser-broken.git")

    page.goto(f"{served.url}/v2/git/{quote(url, safe='')}/main?labpath=index.ipynb")
    expect(page.locator("#failure")).to_be_visible(timeout=LAUNCH_TIMEOUT)
    reason = page.locator("#reason")
    expect(reason).to_contain_text("postBuild")
    expect(reason).to_contain_text("code 7")
    expect(page.locator("#log")).to_contain_text("setting-things-up")
    expect(page).to_have_title(re.compile("^Failed"))
    expect(page.locator('[data-phase="building"]')).to_have_class("failed")
    expect(page.get_by_role("button", name="Retry")).to_be_focused()
    log_link = page.get_by_role("link", name="Open the full build log")
    href = log_link.get_attribute("href")
    assert href.startswith(served.url + "/logs/"), href
    with page.context.expect_page() as opened:
        log_link.click()
    full = opened.value
    expect(full.locator("body")).to_contain_text("setting-things-up")
    full.close()
    assert "/user/" not in page.url  # nothing was launched
    shot(page, "serve-launch-failed")

    # The status page lists the failure with its reason and a link to the log.
    page.goto(served.url + "/status")
    row = page.locator("#launches tbody tr", has_text="browser-broken.git").first
    expect(row).to_contain_text("failed")
    expect(row).to_contain_text("code 7")
    # The status page links relatively (the same page; never an address from the request).
    assert served.url + row.get_by_role("link", name="The whole log").get_attribute("href") == href


def test_the_status_page_counts_running_sessions_per_repository(served, notebook_repo, page):
    # One more session of the notebook repository, launched as a script would.
    stream = requests.get(
        f"{served.url}/build/git/{quote(notebook_repo, safe='')}/main",
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=LAUNCH_TIMEOUT / 1000,
    )
    phases = [
        json.loads(line[6:])["phase"]
        for line in stream.iter_lines(decode_unicode=True)
        if line.startswith("data: ")
    ]
    assert phases[-1] == "ready", phases
    page.goto(served.url + "/status")
    expect(page.locator("#health")).to_have_text("ok")
    expect(page.locator(".checks")).to_contain_text("JupyterHub: ok")
    total = int(page.locator("#sessions-total").inner_text())
    assert total >= 1
    # Counted by repository address, as people know it.
    row = page.locator("section[aria-labelledby=sessions-title] tbody tr", has_text=notebook_repo)
    expect(row).to_have_count(1)
    assert 1 <= int(row.locator("td.num").inner_text()) <= total
    # Whether sessions are fenced off from this machine and private networks.
    state = "on" if firewall_possible() else "off"
    expect(page.locator("p.note").first).to_contain_text(f"Session firewall: {state}")
    expect(page.locator("p.note").nth(1)).to_contain_text(f"Build firewall: {state}")
    expect(page.locator("p.note").nth(2)).to_contain_text("Build limits: ")
    launches = page.locator("#launches tbody tr", has_text="browser-notebook.git")
    expect(launches.first).to_contain_text("success")
    shot(page, "serve-status", full_page=True)


THEBE_PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>thebe</title>
<link rel="stylesheet" href="thebe/thebe-core.css">
<script src="thebe/thebe-core.min.js"></script>
</head>
<body>
<p id="status">loading</p>
<div id="cell"></div>
<pre id="out"></pre>
<script>
const say = (text) => { document.getElementById("status").textContent = text; };
async function run() {
  const api = window.thebeCore.api;
  const params = new URLSearchParams(location.search);
  const config = api.makeConfiguration({
    binderOptions: {
      binderUrl: params.get("binder"),
      repoProvider: "git",
      repo: params.get("repo"),
      ref: "main",
    },
    savedSessionOptions: { enabled: false },
  });
  const server = api.connectToBinder(config);
  await server.ready;
  say("server ready");
  const rendermime = api.makeRenderMimeRegistry();
  const notebook = api.setupNotebookFromBlocks(
    [{ id: "answer", source: "print(6*7)" }], config, rendermime);
  notebook.cells[0].attachToDOM(document.getElementById("cell"));
  const session = await server.startNewSession(rendermime);
  if (!session) throw new Error("no kernel session");
  notebook.attachSession(session);
  say("kernel ready");
  const result = await notebook.cells[0].execute();
  if (!result || result.error) throw new Error("execution failed: " + JSON.stringify(result));
  const text = notebook.cells[0].outputs
    .filter((o) => o.output_type === "stream").map((o) => o.text).join("");
  document.getElementById("out").textContent = text.trim();
  say("done");
}
run().catch((error) => say("error: " + error));
</script>
</body>
</html>
"""


@pytest.fixture(scope="module")
def thebe_site(site) -> StaticSite:
    """thebe-core's browser bundle, from npm (pinned), and a page that uses it."""
    bundle = NPM_CACHE / "node_modules" / "thebe-core" / "dist" / "lib"
    if not (bundle / "thebe-core.min.js").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("needs npm to install thebe-core")
        install = subprocess.run(
            [npm, "install", "--prefix", str(NPM_CACHE), f"thebe-core@{THEBE_VERSION}"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if install.returncode != 0:
            pytest.skip(f"npm could not install thebe-core: {install.stderr[-1000:]}")
    package = json.loads((bundle.parent.parent / "package.json").read_text())
    assert package["version"] == THEBE_VERSION
    root = Path(site.server.RequestHandlerClass.keywords["directory"])
    shutil.copytree(bundle, root / "thebe", ignore=shutil.ignore_patterns("*.map"))
    (root / "thebe.html").write_text(THEBE_PAGE)
    return site


def test_thebe_core_runs_code_from_a_page_on_another_origin(
    served, notebook_repo, thebe_site, page
):
    began = time.monotonic()
    assert urlparse(thebe_site.url).port != urlparse(served.url).port
    query = f"binder={quote(served.url, safe='')}&repo={quote(notebook_repo, safe='')}"
    page.goto(f"{thebe_site.url}/thebe.html?{query}")
    status = page.locator("#status")
    try:
        expect(status).to_have_text(re.compile("^(done|error)"), timeout=LAUNCH_TIMEOUT)
    finally:
        shot(page, "thebe")
    assert status.inner_text() == "done", "\n".join([status.inner_text(), *page.console[-30:]])
    expect(page.locator("#out")).to_have_text("42")
    expect(page.locator("#cell")).to_contain_text("42")
    print(f"thebe-core: 42 after {time.monotonic() - began:.1f} s")
