"""A lock of every build: what it resolved (base digest, Debian and Python packages, the
repository's commit), written by `binderbox build`, kept by the service at
/logs/<id>/lock, and `binderbox build --from-lock` rebuilding the same environment.
Real builds on this dockerd; the packages come from PyPI and Debian's mirror."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import requests
from tests.conftest import binderbox, run_in_image
from tests.test_service_build import build_path, building_service, served_repo

from binderbox.builder.lock import (
    COLLECTOR_SCRIPT,
    MAX_LOCK_BYTES,
    LockError,
    differences,
    parse_lock,
)
from binderbox.builder.plan import AptPackage, BuildPlan, Requirements
from binderbox.builder.render import ImageOptions, render
from binderbox.providers.local import content_hash

FILES = {"requirements.txt": "six\ntoolz\n", "apt.txt": "tree\n", "notes.md": "hello\n"}


def python_packages(image: str) -> list[str]:
    """`uv pip freeze` of the image's environment."""
    command = ("uv", "pip", "freeze", "--no-cache", "--python", "/srv/venv/bin/python")
    frozen = run_in_image(image, *command)
    assert frozen.returncode == 0, frozen.stderr
    return sorted(frozen.stdout.split())


def debian_version(image: str, package: str) -> str:
    shown = run_in_image(image, "dpkg-query", "-W", "-f=${Version}", package)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def one_sentence(text: str) -> str:
    """The error line of a failed command: exactly one, and no traceback."""
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, text
    return errors[0].removeprefix("Error: ")


# --- the real builds ----------------------------------------------------------------------


@pytest.mark.docker
def test_a_build_writes_its_lock_and_the_lock_rebuilds_it_elsewhere(
    build, make_repo, base_image, docker_client, tmp_path
):
    repo = make_repo(FILES, name="paper")
    lock_file = tmp_path / "paper.lock.json"
    first = build("--lock-out", str(lock_file), str(repo))
    assert first.code == 0, first.stderr[-3000:]
    written = [e for e in first.events if e.get("lock")]
    assert [e["lock"] for e in written] == [str(lock_file)]

    locked = parse_lock(lock_file.read_bytes())
    assert locked.image == first.image
    assert locked.repository.provider == "local"
    assert locked.repository.commit == content_hash(repo)
    assert locked.base.image == base_image
    assert locked.base.id == docker_client.images.get(base_image).id
    assert locked.base.binderbox_base and locked.base.os.startswith("debian")
    pins = {p.name: p.version for p in locked.python.packages}
    assert {"six", "toolz", "jupyterlab"} <= set(pins)
    assert f"six=={pins['six']}" in python_packages(first.image)
    assert [(p.name, p.version) for p in locked.debian] == [
        ("tree", debian_version(first.image, "tree"))
    ]
    # The image carries what it holds, for anyone who has only the image.
    shown = run_in_image(first.image, "cat", "/srv/binderbox/environment.json")
    assert json.loads(shown.stdout)["format"] == "binderbox-environment"

    # Years later, in another folder: the same environment.
    elsewhere = tmp_path / "elsewhere" / "paper-copy"
    shutil.copytree(repo, elsewhere)
    relock = tmp_path / "rebuilt.lock.json"
    second = build("--from-lock", str(lock_file), "--lock-out", str(relock), str(elsewhere))
    assert second.code == 0, second.stderr[-3000:]
    assert second.image != first.image
    messages = [e["message"] for e in second.events]
    assert any(m.startswith("The rebuilt environment matches the lock") for m in messages)
    assert python_packages(second.image) == python_packages(first.image)
    assert debian_version(second.image, "tree") == debian_version(first.image, "tree")
    rebuilt = parse_lock(relock.read_bytes())
    assert differences(locked, rebuilt) == []
    labels = docker_client.images.get(second.image).labels
    assert labels["binderbox.from-lock"] == locked.digest()

    # The same lock again: the rebuilt image is reused, and its lock written again.
    third = build("--from-lock", str(lock_file), "--lock-out", str(relock), str(elsewhere))
    assert third.code == 0 and third.image == second.image
    assert "already exists" in " ".join(e["message"] for e in third.events)
    assert parse_lock(relock.read_bytes()).python == rebuilt.python


@pytest.mark.docker
def test_the_service_keeps_the_lock_beside_the_log_and_it_rebuilds_the_commit(
    base_image, built_images, git_server, tmp_path
):
    url = served_repo(git_server, tmp_path, FILES, "locked")
    with building_service(built_images, "lock") as service:
        events, _ = service.events(build_path(url, build_only="true"))
        built = next(e for e in events if e["phase"] == "built" and e.get("build_id"))
        assert events[-1]["phase"] == "ready"
        lock_url = f"{service.url}/logs/{built['build_id']}/lock"
        assert built["lock_url"] == lock_url
        answer = requests.get(lock_url, timeout=10)
        log = requests.get(f"{service.url}/logs/{built['build_id']}", timeout=10)
        unknown = requests.get(f"{service.url}/logs/{'0' * 32}/lock", timeout=10)
        odd = requests.get(f"{service.url}/logs/..%2f..%2fetc/lock", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    filename = f"binderbox-lock-{built['build_id'][:12]}.json"
    assert answer.headers["content-disposition"] == f'inline; filename="{filename}"'
    assert f"lock: {lock_url}" in log.text.splitlines()
    assert unknown.status_code == 404 and odd.status_code == 404
    assert unknown.text.count("\n") == 1 and unknown.text.startswith("There is no lock")

    locked = parse_lock(answer.content)
    assert locked.image == built["image"]
    assert (locked.repository.provider, locked.repository.url) == ("git", url)
    assert locked.repository.ref == "main"
    assert locked.repository.commit == built["image"].rsplit(":", 1)[1]
    assert {"six", "toolz"} <= {p.name for p in locked.python.packages}

    # No REPO: the lock's own repository, at its commit (the branch may have moved on).
    lock_file = tmp_path / "from-the-service.json"
    lock_file.write_bytes(answer.content)
    relock = tmp_path / "rebuilt-from-the-service.json"
    result = binderbox(
        "build", "--json-logs", "--from-lock", str(lock_file), "--lock-out", str(relock)
    )
    if result.image:
        built_images.add(result.image)
    assert result.code == 0, result.stderr[-3000:]
    messages = [e["message"] for e in result.events]
    assert any(m.startswith("The rebuilt environment matches the lock") for m in messages)
    assert python_packages(result.image) == python_packages(built["image"])
    assert parse_lock(relock.read_bytes()).repository.commit == locked.repository.commit


@pytest.mark.docker
def test_a_lock_whose_base_is_gone_is_refused_in_one_sentence(make_repo, tmp_path):
    lock = valid_lock()
    lock["base"]["id"] = "sha256:" + "0" * 64
    lock["base"]["image"] = "binderbox/base:bookworm-19990101"
    lock["repository"].update(provider="local", url=str(make_repo({"a.txt": "a"})))
    path = tmp_path / "gone.json"
    path.write_text(json.dumps(lock))
    result = binderbox("build", "--from-lock", str(path))
    assert result.code == 1
    message = one_sentence(result.stderr)
    assert "binderbox/base:bookworm-19990101" in message
    assert "is not on this machine and cannot be got" in message


# --- hostile lock files ------------------------------------------------------------------


def valid_lock() -> dict:
    return {
        "format": "binderbox-lock",
        "version": 1,
        "repository": {"provider": "git", "url": "https://example.org/r.git", "commit": "a" * 40},
        "user": {"id": 1000, "name": "jovyan", "target_repo_dir": ""},
        "base": {"image": "binderbox/base:bookworm-20261201", "id": "sha256:" + "1" * 64},
        "python": {"version": "3.11.2", "packages": [{"name": "six", "version": "1.17.0"}]},
        "debian": {"packages": [{"name": "tree", "version": "2.1.0-1", "architecture": "amd64"}]},
        "r": None,
    }


def changed(path: str, value) -> dict:
    """A valid lock with the field at ``path`` (dots; digits index lists) set to ``value``."""
    lock = copy.deepcopy(valid_lock())
    *parents, last = path.split(".")
    here = lock
    for key in parents:
        here = here[int(key)] if key.isdigit() else here[key]
    here[int(last) if last.isdigit() else last] = value
    return lock


HOSTILE = {
    "not JSON": (b"{not json", "is not JSON"),
    "not UTF-8": (b"\xff\xfe{}", "is not UTF-8"),
    "too large": (b" " * (MAX_LOCK_BYTES + 1), "is larger than"),
    "nested deeply": (b"[" * 200_000, "nested too deeply"),
    "a list": (b"[]", "must be an object"),
    "another format": (json.dumps({"format": "pip-lock"}), "is not a binderbox lock"),
    "a newer version": (json.dumps(changed("version", 2)), "written by a newer binderbox"),
    "a version as text": (json.dumps(changed("version", "1")), "must be a whole number"),
    "shell in a Python name": (
        json.dumps(changed("python.packages.0.name", "six; rm -rf /")),
        "is not a Python package name",
    ),
    "shell in a Python version": (
        json.dumps(changed("python.packages.0.version", "1.0 && curl evil")),
        "is not a package version",
    ),
    "a requirement line in a version": (
        json.dumps(changed("python.packages.0.version", "1.0\n--index-url http://evil")),
        "control characters",
    ),
    "a version that is not PEP 440": (
        json.dumps(changed("python.packages.0.version", "latest")),
        "is not a package version",
    ),
    "a package twice": (
        json.dumps(
            changed(
                "python.packages",
                [{"name": "six", "version": "1.17.0"}, {"name": "Six", "version": "1.16.0"}],
            )
        ),
        "twice",
    ),
    "packages as an object": (json.dumps(changed("python.packages", {"six": "1"})), "a list"),
    "shell in a Debian name": (
        json.dumps(changed("debian.packages.0.name", "tree$(reboot)")),
        "is not a Debian package name",
    ),
    "shell in a Debian version": (
        json.dumps(changed("debian.packages.0.version", "2.1;reboot")),
        "is not a Debian version",
    ),
    "a base id that is no digest": (
        json.dumps(changed("base.id", "sha256:../../x")),
        "is not sha256:<64 hex>",
    ),
    "a base name with a space": (
        json.dumps(changed("base.image", "binderbox/base:x --privileged")),
        "is not an image name",
    ),
    "root": (json.dumps(changed("user.name", "root")), "names root"),
    "user id 0": (json.dumps(changed("user.id", 0)), "from 1 to 65534"),
    "a subdir outside": (
        json.dumps(changed("repository.subdir", "../../etc")),
        "is not a folder in the repository",
    ),
    "a repository folder with ..": (
        json.dumps(changed("user.target_repo_dir", "/home/../etc")),
        "names root or a path with '..'",
    ),
    "a commit with shell": (
        json.dumps(changed("repository.commit", "$(id)")),
        "is not a commit or content id",
    ),
    "a local CRAN mirror": (
        json.dumps(changed("r", {"version": "4.2.2", "cran_mirror": "file:///etc"})),
        "is not an http(s) address",
    ),
    "too many packages": (
        json.dumps(
            changed(
                "debian.packages",
                [{"name": f"p{i}", "version": "1"} for i in range(20_001)],
            )
        ),
        "has more than 20000 entries",
    ),
}


@pytest.mark.parametrize(("raw", "words"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_lock_files_are_refused_in_one_sentence(raw, words):
    with pytest.raises(LockError) as refused:
        parse_lock(raw.encode() if isinstance(raw, str) else raw, "The lock file x.json")
    message = refused.value.message
    assert words in message
    assert message.startswith("The lock file x.json ") and message.endswith(".")
    assert "\n" not in message and len(message) < 600


def test_a_valid_lock_reads_back_and_writes_the_same_text():
    lock = parse_lock(json.dumps(valid_lock()))
    assert lock.python.packages[0].pin() == "six==1.17.0"
    again = parse_lock(lock.text())
    assert again == lock and again.text() == lock.text()
    assert lock.text().count('{"name": ') == 2  # one package to a line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--from-lock", "{dir}/missing.json"], "cannot be read"),
        (["--from-lock", "{dir}/bad.json", "."], "is not a usable lock"),
        (["--from-lock", "{dir}/bad.json", "--ref", "main"], "--ref does not go with --from-lock"),
        ([], "Give REPO"),
    ],
)
def test_the_cli_refuses_bad_locks_without_a_traceback(tmp_path, args, words):
    (tmp_path / "bad.json").write_text(json.dumps(changed("base.id", "sha256:nope")))
    result = binderbox("build", *[a.format(dir=tmp_path) for a in args], timeout=60)
    assert result.code == 1
    assert words in one_sentence(result.stderr)


def test_differences_name_what_changed():
    wanted = parse_lock(json.dumps(valid_lock()))
    other = changed("python.packages", [{"name": "six", "version": "1.16.0"}])
    other["debian"]["packages"] = []
    found = differences(wanted, parse_lock(json.dumps(other)))
    assert found == [
        "Python six: 1.17.0 locked, 1.16.0 built",
        "Debian tree:amd64: 2.1.0-1 locked, absent built",
    ]


def test_the_collector_is_valid_python():
    compile(COLLECTOR_SCRIPT, "collect-environment.py", "exec")


# --- what the Dockerfile gets ------------------------------------------------------------


def test_the_last_build_step_records_the_environment():
    recipe = render(BuildPlan(post_build="postBuild"), ImageOptions(base_image="base:1"))
    runs = [line for line in recipe.dockerfile.splitlines() if line.startswith("RUN ")]
    assert "postBuild" in runs[-2]
    assert runs[-1].endswith(
        "/usr/bin/python3 /tmp/binderbox-lock/collect-environment.py"
        " /tmp/binderbox-lock/base-dpkg-status"
    )
    assert "--mount=type=bind,from=base:1,source=/var/lib/dpkg/status," in runs[-1]
    assert recipe.support_files["collect-environment.py"] == COLLECTOR_SCRIPT
    assert recipe.steps[-1].description == "recording the environment for the build's lock"


def test_a_rebuild_installs_the_locked_packages_first_and_pins_apt():
    plan = BuildPlan(
        apt_packages=(AptPackage("tree", "2.1.0-1"),),
        requirements=Requirements("requirements.txt", local=False),
    )
    options = ImageOptions(
        base_image="base:1", locked_python=("six==1.17.0", "toolz==1.2.0"), locked_apt=True
    )
    recipe = render(plan, options)
    text = recipe.dockerfile
    assert "apt-get install -y --no-install-recommends --allow-downgrades tree=2.1.0-1" in text
    assert recipe.support_files["locked-requirements.txt"] == "six==1.17.0\ntoolz==1.2.0\n"
    locked = text.index("--no-deps -r /tmp/binderbox-deps/locked.txt")
    assert (
        text.index("apt-get install") < locked < text.index("-r /tmp/binderbox-deps/requirements")
    )
    assert "--allow-downgrades" not in render(plan, ImageOptions(base_image="base:1")).dockerfile
