"""The checkout check and the bounded readers (pure: files on disk, no Docker)."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from pathlib import Path

import pytest

from binderbox.builder import conda, pipfile, repofiles
from binderbox.builder.detect import detect
from binderbox.builder.pipeline import ignore_patterns
from binderbox.errors import (
    MAX_MESSAGE_CHARS,
    BinderboxError,
    ConfigError,
    RepositoryRefused,
    quoted,
)
from binderbox.providers import LocalSource

# A 400-byte "billion laughs": nine aliases of nine aliases, nine levels deep.
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def tree(root: Path, files: dict[str, str], links: dict[str, str]) -> Path:
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for rel, target in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)
    return root


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    """A file outside every repository, holding a marker no message may show."""
    path = tmp_path / "host" / "secret.txt"
    path.parent.mkdir()
    path.write_text("MARKER-7f3a9c host content\n")
    return path


@pytest.mark.parametrize(
    "links",
    [
        {"data": "/etc"},  # absolute
        {"data": "../outside"},  # .. past the root
        {"sub/deep/up": "../../../outside"},  # .. past the root from below
        {"sub/x": "../a", "a": "b", "b": "sub/../.."},  # a chain whose last link leaves
        {"d": "sub", "sub/y": "../d/../../outside"},  # through a link to a folder
    ],
)
def test_a_link_out_of_the_repository_is_refused_naming_it(tmp_path, links):
    root = tree(tmp_path / "repo", {"sub/deep/file.txt": "x"}, links)
    with pytest.raises(RepositoryRefused) as caught:
        repofiles.check_checkout(root)
    assert "outside the repository" in caught.value.message
    assert any(repr(rel) in caught.value.message for rel in links)


def test_links_inside_the_repository_pass(tmp_path):
    root = tree(
        tmp_path / "repo",
        {"requirements.txt": "six\n", "data/v1/table.csv": "a,b\n"},
        {
            "binder/requirements.txt": "../requirements.txt",
            "data/latest": "v1",
            "data/also": "./latest/../v1/table.csv",
            "dangling": "not-there-yet",
            "selfdir": ".",
        },
    )
    assert repofiles.check_checkout(root) == []
    assert repofiles.read_text(root, "binder/requirements.txt") == "six\n"
    assert repofiles.read_text(root, "data/also") == "a,b\n"


def test_the_check_does_not_walk_into_linked_folders(tmp_path):
    outside = tmp_path / "big"
    outside.mkdir()
    os.mkfifo(outside / "pipe")  # would be refused if the walk followed the link
    root = tree(tmp_path / "repo", {}, {"inside": "sub"})
    (root / "sub").mkdir()
    os.symlink("../inside", root / "sub" / "back")
    assert repofiles.check_checkout(root) == []


def test_a_loop_of_links_is_refused_in_a_fetched_repository(tmp_path):
    root = tree(tmp_path / "repo", {}, {"a": "b", "b": "a"})
    with pytest.raises(RepositoryRefused, match="loop of links"):
        repofiles.check_checkout(root)


def test_pipes_and_sockets_are_refused(tmp_path):
    root = tree(tmp_path / "repo", {"a.txt": "x"}, {})
    os.mkfifo(root / "pipe")
    with pytest.raises(RepositoryRefused, match="'pipe' in the repository is a named pipe"):
        repofiles.check_checkout(root)
    os.unlink(root / "pipe")
    (root / "s").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "s" / "sock"))
        with pytest.raises(RepositoryRefused, match="'s/sock' in the repository is a socket"):
            repofiles.check_checkout(root)


def test_the_users_own_folder_keeps_its_links_out_with_a_warning(tmp_path, host_file):
    root = tree(tmp_path / "repo", {"a.txt": "x"}, {"data": str(host_file.parent)})
    warnings = repofiles.check_checkout(root, own_folder=True, label="the folder")
    assert len(warnings) == 1
    assert "'data' is a link to" in warnings[0] and "outside the folder" in warnings[0]
    # …but nothing is read through it, and configuration files must still be inside.
    os.symlink(str(host_file), root / "requirements.txt")
    with pytest.raises(ConfigError, match=r"'requirements\.txt' is a link that leaves"):
        detect(root)


def test_the_users_own_folder_refuses_pipes_before_reading_them(tmp_path):
    root = tree(tmp_path / "repo", {"a.txt": "x"}, {})
    os.mkfifo(root / "pipe")
    source = LocalSource(root)
    started = time.monotonic()
    with pytest.raises(RepositoryRefused, match="'pipe'"):
        source.fetch(tmp_path / "copy")
    assert time.monotonic() - started < 5
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize(
    "files, link, target",
    [
        ({}, "runtime.txt", "/proc/self/environ"),
        ({}, "requirements.txt", "HOST"),
        ({"binder/x": ""}, "binder/environment.yml", "../../host/secret.txt"),
        ({}, "apt.txt", "HOST"),
        ({}, "Pipfile.lock", "HOST"),
        ({}, "Pipfile", "HOST"),
        ({}, "pyproject.toml", "HOST"),
        ({}, "setup.py", "HOST"),
        ({}, "install.R", "HOST"),
        ({}, "DESCRIPTION", "HOST"),
        ({}, "postBuild", "HOST"),
        ({}, "start", "HOST"),
        ({}, "Dockerfile", "HOST"),
        ({}, "binder", "HOSTDIR"),
        ({"binder/Dockerfile": "FROM x\n"}, "binder/.dockerignore", "HOST"),
    ],
)
def test_detection_reads_no_configuration_file_through_a_link_out(
    tmp_path, host_file, files, link, target
):
    target = {"HOST": str(host_file), "HOSTDIR": str(host_file.parent)}.get(target, target)
    root = tree(tmp_path / "repo", files, {link: target})
    with pytest.raises(ConfigError) as caught:
        detect(root)
        ignore_patterns(root, "binder")
    message = caught.value.message
    assert f"'{link}' is a link that leaves the repository" in message
    assert "MARKER" not in message and "PATH=" not in message


def test_a_configuration_file_inside_through_links_is_read(tmp_path):
    root = tree(
        tmp_path / "repo",
        {"conf/requirements.txt": "six\n", "conf/runtime.txt": "python-3.11\n"},
        {"binder": "conf", "conf/apt.txt": "../apt-list", "apt-list": "real-apt"},
    )
    (root / "real-apt").write_text("graphviz\n")
    plan = detect(root)
    assert plan.config_dir == "binder"
    assert plan.requirements.path == "binder/requirements.txt"
    assert plan.python_version == "3.11"
    assert [p.name for p in plan.apt_packages] == ["graphviz"]


def test_a_configuration_file_over_the_size_cap_is_refused_in_one_sentence(tmp_path):
    root = tree(tmp_path / "repo", {"requirements.txt": "six\n" * 300_000}, {})
    with pytest.raises(ConfigError) as caught:
        detect(root)
    assert caught.value.message == (
        "'requirements.txt' is larger than 1 MB, the limit for a configuration file."
    )


def test_a_pipe_named_like_a_configuration_file_does_not_hang(tmp_path):
    root = tree(tmp_path / "repo", {}, {})
    os.mkfifo(root / "requirements.txt")
    with pytest.raises(ConfigError, match=r"'requirements\.txt' is a named pipe, not a file"):
        detect(root)
    with pytest.raises(ConfigError, match="named pipe"):
        repofiles.read_text(root, "requirements.txt")


def test_write_new_replaces_a_link_without_writing_through_it(tmp_path, host_file):
    before = host_file.read_bytes(), host_file.stat().st_mtime_ns
    root = tree(tmp_path / "repo", {}, {".dockerignore": str(host_file)})
    repofiles.write_new(root / ".dockerignore", "*.csv\n")
    assert (host_file.read_bytes(), host_file.stat().st_mtime_ns) == before
    assert not (root / ".dockerignore").is_symlink()
    assert (root / ".dockerignore").read_text() == "*.csv\n"


def test_an_alias_bomb_fails_at_once_in_little_memory():
    assert len(ALIAS_BOMB) < 400
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError) as caught:
            conda.translate(ALIAS_BOMB, "environment.yml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 0.5
    assert peak < 5_000_000
    assert caught.value.message == (
        "environment.yml line 2 uses a YAML alias (*name); binderbox does not expand aliases, "
        "write the entries out."
    )


def test_a_merge_key_is_an_alias_too():
    text = "base: &base {name: x}\nother:\n  <<: *base\ndependencies: [six]\n"
    with pytest.raises(ConfigError, match="line 3 uses a YAML alias"):
        conda.translate(text, "environment.yml")


def test_anchors_alone_are_fine():
    assert conda.translate("dependencies: &deps [six]\n", "environment.yml").requirements == (
        "six\n"
    )


@pytest.mark.parametrize(
    "parse, text, name",
    [
        (conda.translate, "[" * 200_000, "environment.yml"),
        (
            conda.translate,
            "dependencies:\n" + "".join(" " * i + "- \n" for i in range(1, 1200)),
            "environment.yml",
        ),
        (pipfile.from_lock, "[" * 200_000, "Pipfile.lock"),
        (pipfile.from_pipfile, "a = " + "[" * 200_000, "Pipfile"),
        (pipfile.from_pipfile, "a = " + "{b = " * 50_000, "Pipfile"),
    ],
)
def test_deep_nesting_is_one_sentence(parse, text, name):
    with pytest.raises(ConfigError) as caught:
        parse(text, name)
    assert caught.value.message.startswith(name)
    assert len(caught.value.message) < 300


def test_a_long_offending_line_is_quoted_cut_and_escaped(tmp_path):
    line = "\x1b[31mred\x07" + "y" * 100_000
    root = tree(tmp_path / "repo", {"apt.txt": f"{line}\nother\n"}, {})
    with pytest.raises(ConfigError) as caught:
        detect(root)
    message = caught.value.message
    assert message.startswith("apt.txt line 1: '\\x1b[31mred\\x07yyy")
    assert "\x1b" not in message and "\x07" not in message and "other" not in message
    assert len(message) < 400
    with pytest.raises(ConfigError) as caught:
        conda.translate(f"dependencies:\n  - {{a: '{line}'}}\n", "environment.yml")
    assert len(caught.value.message) < 400 and "\x1b" not in caught.value.message


def test_quoted_and_the_message_cap():
    assert quoted("numpy\t1") == "'numpy\\t1'"
    assert quoted("x" * 500) == "'" + "x" * 200 + "'…"
    assert len(quoted({"k": ["v" * 1000] * 1000})) < 210
    error = BinderboxError("word " * 100_000)
    assert len(error.message) < MAX_MESSAGE_CHARS + 50
    assert str(error) == error.message


def test_a_subdir_reached_through_a_link_is_not_a_real_folder(tmp_path):
    root = tree(tmp_path / "repo", {"real/a.txt": "x"}, {"linked": "real", "out": "/etc"})
    assert repofiles.real_folder(root, "real")
    assert not repofiles.real_folder(root, "linked")
    assert not repofiles.real_folder(root, "out")
    assert not repofiles.real_folder(root, "missing")
