"""Building from git URLs served by a real ``git daemon`` on 127.0.0.1, with real Docker.

Every build runs the real ``binderbox`` command with its own ``TMPDIR``, so leftover
``binderbox-build-*`` folders are attributable to that very command even while other builds
run on this machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CliResult, GitServer, binderbox, commit_all, free_port, git, run_in_image

pytestmark = pytest.mark.docker


# --- helpers -------------------------------------------------------------------------------


def publish(server: GitServer, work: Path, name: str) -> str:
    """Publish ``work`` and point the served repository's HEAD at the work tree's branch.

    (``git init --bare`` names its HEAD after ``init.defaultBranch``, which may not be the
    branch that was pushed; a served repository's HEAD must exist for a build without --ref.)
    """
    url = server.publish(work, name)
    branch = git("symbolic-ref", "--short", "HEAD", cwd=work)
    git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=server.root / name)
    return url


def write(work: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def build_dirs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("binderbox-build-")}


def assert_clean_failure(result: CliResult) -> str:
    """A failed command: exit code 1, one `failed` event, one line, no traceback."""
    assert result.code == 1, (result.code, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    failed = [e for e in result.events if e.get("phase") == "failed"]
    assert len(failed) == 1, result.events
    message = failed[0]["message"]
    assert message.strip() and "\n" not in message, message
    assert "unexpectedly" not in message, message
    assert not [e for e in result.events if e.get("phase") == "built"], result.events
    return message


def image_file(image: str, path: str) -> str:
    result = run_in_image(image, "cat", path)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def gbuild(
    base_image: str, built_images: set[str], tmp_path: Path
) -> Callable[..., tuple[CliResult, float]]:
    """``binderbox build --json-logs ARGS`` with a private TMPDIR checked for leftovers."""
    tmpdir = tmp_path / "binderbox-tmp"
    tmpdir.mkdir()

    def run(*args: str) -> tuple[CliResult, float]:
        started = time.monotonic()
        result = binderbox("build", "--json-logs", *args, env={"TMPDIR": str(tmpdir)})
        seconds = time.monotonic() - started
        if result.image:
            built_images.add(result.image)
        assert build_dirs(tmpdir) == set(), "a binderbox-build-* folder was left behind"
        return result, seconds

    return run


@pytest.fixture(scope="module")
def history(git_server: GitServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A served repository whose refs each point at a commit with a different ``file``.

    v1 (lightweight tag) → rev1, v2 (annotated tag) → rev2, branch feature → rev3,
    main: rev4 → rev5 → rev6 (HEAD).
    """
    work = tmp_path_factory.mktemp("history-work")
    commits: dict[str, str] = {}
    for n in (1, 2):
        write(work, {"file": f"rev{n}\n"})
        commits[f"rev{n}"] = commit_all(work, f"rev{n}")
    git("tag", "v1", commits["rev1"], cwd=work)
    git("tag", "-a", "v2", "-m", "annotated v2", commits["rev2"], cwd=work)
    git("checkout", "--quiet", "-b", "feature", cwd=work)
    write(work, {"file": "rev3\n"})
    commits["rev3"] = commit_all(work, "rev3")
    git("checkout", "--quiet", "main", cwd=work)
    for n in (4, 5, 6):
        write(work, {"file": f"rev{n}\n"})
        commits[f"rev{n}"] = commit_all(work, f"rev{n}")
    # The annotated tag's object is not the commit: a build must peel it.
    assert git("rev-parse", "v2", cwd=work) != commits["rev2"]
    commits["url"] = publish(git_server, work, "history")
    return commits


# --- building refs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref_of", "rev"),
    [
        pytest.param(lambda c: "", "rev6", id="no-ref-HEAD"),
        pytest.param(lambda c: "feature", "rev3", id="branch"),
        pytest.param(lambda c: "v1", "rev1", id="lightweight-tag"),
        pytest.param(lambda c: "v2", "rev2", id="annotated-tag"),
        pytest.param(lambda c: c["rev4"], "rev4", id="full-commit"),
        pytest.param(lambda c: c["rev5"][:9], "rev5", id="abbreviated-commit"),
    ],
)
def test_build_by_url_at_ref(history, gbuild, docker_client, ref_of, rev):
    ref = ref_of(history)
    args = [history["url"], *(["--ref", ref] if ref else [])]
    result, _ = gbuild(*args)
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    image = result.image
    assert image, result.events

    labels = docker_client.images.get(image).labels
    assert labels["binderbox.commit"] == history[rev]
    assert labels["binderbox.repo"] == history["url"]
    assert labels["binderbox.ref"] == (ref or "HEAD")
    # The image name carries the resolved full commit, not the ref as typed.
    assert image.split(":", 1)[1] == history[rev]
    assert image_file(image, "file") == rev


# --- reuse and change ----------------------------------------------------------------------


def test_same_ref_is_reused_and_a_new_commit_renames_the_image(
    git_server, gbuild, docker_client, tmp_path
):
    work = tmp_path / "work"
    write(work, {"file": "first\n"})
    first = commit_all(work, "first")
    url = publish(git_server, work, f"reuse-{tmp_path.name}")

    built, _ = gbuild(url, "--ref", "main")
    assert built.code == 0, built.stdout[-3000:]
    image = built.image
    assert docker_client.images.get(image).labels["binderbox.commit"] == first
    image_id = docker_client.images.get(image).id

    again, seconds = gbuild(url, "--ref", "main")
    assert again.code == 0, again.stdout[-3000:]
    assert again.image == image
    # One "built" names the image; the CLI's next one says where it wrote the lock.
    done = [e for e in again.events if e["phase"] == "built" and "image" in e]
    assert len(done) == 1
    assert "already exists" in done[0]["message"] or "reus" in done[0]["message"]
    assert [e["lock"] for e in again.events if e["phase"] == "built" and "lock" in e]
    # Reuse is decided from `git ls-remote`: nothing is fetched and nothing is built.
    assert not [e for e in again.events if e["phase"] == "building"], again.events
    assert not [e for e in again.events if e["message"].startswith("Fetching")], again.events
    assert docker_client.images.get(image).id == image_id
    assert seconds < 20, f"reusing an image took {seconds:.1f} s"

    write(work, {"file": "second\n"})
    second = commit_all(work, "second")
    publish(git_server, work, f"reuse-{tmp_path.name}")
    changed, _ = gbuild(url, "--ref", "main")
    assert changed.code == 0, changed.stdout[-3000:]
    assert changed.image != image
    assert second in changed.image
    assert not any("already exists" in e["message"] for e in changed.events)
    assert docker_client.images.get(changed.image).labels["binderbox.commit"] == second
    assert image_file(changed.image, "file") == "second"


def test_abbreviated_commit_is_reused_once_resolved(history, gbuild):
    ref = history["rev5"][:12]
    first, _ = gbuild(history["url"], "--ref", ref)
    assert first.code == 0, first.stdout[-3000:]
    second, _ = gbuild(history["url"], "--ref", ref)
    assert second.code == 0, second.stdout[-3000:]
    assert second.image == first.image
    assert any("already exists" in e["message"] for e in second.events if e["phase"] == "built")


# --- submodules ----------------------------------------------------------------------------


def test_submodule_is_checked_out_in_the_image(git_server, gbuild, docker_client, tmp_path):
    sub_work = tmp_path / "sub"
    write(sub_work, {"subfile.txt": "from the submodule\n"})
    commit_all(sub_work, "sub")
    sub_url = publish(git_server, sub_work, f"sub-{tmp_path.name}")

    main_work = tmp_path / "main"
    write(main_work, {"file": "main repo\n"})
    commit_all(main_work, "main")
    git(
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "--quiet",
        sub_url,
        "sub",
        cwd=main_work,
    )
    commit = commit_all(main_work, "add submodule")
    url = publish(git_server, main_work, f"super-{tmp_path.name}")

    result, _ = gbuild(url)
    assert result.code == 0, result.stdout[-3000:]
    assert docker_client.images.get(result.image).labels["binderbox.commit"] == commit
    assert image_file(result.image, "sub/subfile.txt") == "from the submodule"
    assert image_file(result.image, "file") == "main repo"


def test_ext_submodule_is_not_run(git_server, gbuild, tmp_path):
    """A repository's .gitmodules must not make git run commands (ext:: transport)."""
    marker = tmp_path / "ext-submodule-ran"
    work = tmp_path / "work"
    write(work, {"file": "x\n"})
    commit_all(work, "init")
    sub = work / "sub"
    sub.mkdir()
    write(sub, {"f": "f\n"})
    sub_commit = commit_all(sub, "sub")
    git("update-index", "--add", "--cacheinfo", f"160000,{sub_commit},sub", cwd=work)
    write(
        work,
        {".gitmodules": f'[submodule "sub"]\n\tpath = sub\n\turl = ext::sh -c touch% {marker}\n'},
    )
    git("add", ".gitmodules", cwd=work)
    git("commit", "--quiet", "-m", "evil submodule", cwd=work)
    url = publish(git_server, work, f"evil-{tmp_path.name}")

    result, _ = gbuild(url)
    message = assert_clean_failure(result)
    assert "submodule" in message.lower(), message
    assert not marker.exists()


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["no-such-branch", "deadbeef0", "f" * 40])
def test_unknown_ref_fails_with_its_name(history, gbuild, ref):
    result, _ = gbuild(history["url"], "--ref", ref)
    message = assert_clean_failure(result)
    assert f"'{ref}'" in message, message
    assert "not found" in message, message


def test_unreachable_url_fails_clearly(gbuild):
    url = f"git://127.0.0.1:{free_port()}/x"
    result, seconds = gbuild(url)
    message = assert_clean_failure(result)
    assert url in message, message
    assert "Could not fetch" in message, message
    assert seconds < 60


def test_missing_repository_on_server_fails_clearly(git_server, gbuild):
    url = git_server.url("there-is-no-such-repository")
    result, _ = gbuild(url)
    message = assert_clean_failure(result)
    assert url in message, message


@pytest.mark.parametrize(
    "make_url",
    [
        lambda marker: f"-oProxyCommand@127.0.0.1:{marker}",
        lambda marker: f"--upload-pack=touch {marker}",
        lambda marker: f"ext::sh -c touch% {marker}",
        lambda marker: f"EXT::sh -c touch% {marker}",
    ],
    ids=["dash-scp-like", "dash-option", "ext", "EXT"],
)
def test_dangerous_urls_are_refused(gbuild, tmp_path, make_url):
    marker = tmp_path / "url-command-ran"
    url = make_url(marker)
    result, _ = gbuild("--", url)
    message = assert_clean_failure(result)
    assert url in message, message
    assert not marker.exists()
    # Refused before git ran: nothing was resolved or fetched.
    assert not [e for e in result.events if e["phase"] == "fetching"], result.events


def test_ssh_url_with_option_like_host_runs_nothing(gbuild, tmp_path):
    """git blocks hosts that start with '-' (ssh option injection); no command may run."""
    # The host part cannot hold a '/': ssh's ProxyCommand shell would expand $TMPDIR (the
    # command's private temp dir, tmp_path / "binderbox-tmp") and create the marker.
    marker = tmp_path / "binderbox-tmp.ran"
    url = "ssh://-oProxyCommand=touch%20$TMPDIR.ran/x"
    result, _ = gbuild(url)
    message = assert_clean_failure(result)
    assert url in message, message
    assert not marker.exists()


def test_ext_url_is_refused_as_a_git_url(gbuild, tmp_path):
    result, _ = gbuild("--", f"ext::sh -c touch% {tmp_path / 'ext-ran'}")
    message = assert_clean_failure(result)
    assert "not a git URL" in message, message


@pytest.mark.parametrize(
    "ref", ["--upload-pack=touch {marker}", "-c", "-", "main..v1", "main@{{1}}", "v1^{{}}"]
)
def test_option_like_or_malformed_ref_is_refused(history, gbuild, tmp_path, ref):
    marker = tmp_path / "ref-command-ran"
    ref = ref.format(marker=marker)
    result, _ = gbuild(history["url"], f"--ref={ref}")
    message = assert_clean_failure(result)
    assert "not a valid git ref" in message, message
    assert f"'{ref}'" in message, message
    assert not marker.exists()
    # Refused before git ran: nothing was resolved or fetched.
    assert not [e for e in result.events if e["phase"] == "fetching"], result.events
