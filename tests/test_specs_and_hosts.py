"""Launch specs in BinderHub's syntax, and the remote-host checks (pure: a fake resolver
stands in for DNS so the addresses are known)."""

from __future__ import annotations

import pytest

from binderbox.errors import SourceError
from binderbox.providers.hosts import check_remote_url, is_public
from binderbox.service.specs import SpecError, parse_spec


@pytest.mark.parametrize(
    ("provider", "spec", "url", "ref"),
    [
        (
            "gh",
            "binder-examples/requirements/HEAD",
            "https://github.com/binder-examples/requirements",
            "HEAD",
        ),
        ("gh", "org/repo.git/main", "https://github.com/org/repo", "main"),
        (
            "gh",
            "org/repo/feature/with/slashes",
            "https://github.com/org/repo",
            "feature/with/slashes",
        ),
        (
            "gl",
            "gitlab-org%2Fgitlab-foss/master",
            "https://gitlab.com/gitlab-org/gitlab-foss",
            "master",
        ),
        ("gl", "group%2Fsub%2Fproject/v1.0", "https://gitlab.com/group/sub/project", "v1.0"),
        ("gist", "someone/8f2c3a", "https://gist.github.com/someone/8f2c3a.git", "HEAD"),
        ("gist", "someone/8f2c3a/abc123", "https://gist.github.com/someone/8f2c3a.git", "abc123"),
        (
            "git",
            "https%3A%2F%2Fexample.org%2Frepo.git/main",
            "https://example.org/repo.git",
            "main",
        ),
        (
            "git",
            "git%3A%2F%2F127.0.0.1%3A9418%2Frepo/0123abc",
            "git://127.0.0.1:9418/repo",
            "0123abc",
        ),
    ],
)
def test_specs_parse_as_binderhub_does(provider, spec, url, ref):
    parsed = parse_spec(provider, spec)
    assert (parsed.repo_url, parsed.ref) == (url, ref)


@pytest.mark.parametrize(
    ("provider", "spec", "words"),
    [
        ("gh", "just-a-name", "not a GitHub spec"),
        ("gh", "org/repo/--upload-pack=x", "not a valid branch"),
        ("gh", "org/repo/a..b", "not a valid branch"),
        ("gl", "noslash", "not a GitLab spec"),
        ("gist", "user/not-hex", "not a gist spec"),
        ("git", "https%3A%2F%2Fexample.org", "not a git spec"),
        ("git", "-oProxyCommand%3Dx/main", "not a repository URL"),
        ("svn", "a/b/c", "Unknown provider 'svn'"),
    ],
)
def test_bad_specs_are_refused_with_a_sentence(provider, spec, words):
    with pytest.raises(SpecError, match=words):
        parse_spec(provider, spec)


def test_persistent_spec_pins_the_commit():
    parsed = parse_spec("gh", "org/repo/main")
    assert parsed.persistent("a" * 40) == "org/repo/" + "a" * 40
    git = parse_spec("git", "https%3A%2F%2Fexample.org%2Fr.git/main")
    assert git.persistent("b" * 40) == "https%3A%2F%2Fexample.org%2Fr.git/" + "b" * 40


def dns(table):
    return lambda host: table[host]


PUBLIC = dns({"example.org": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})


@pytest.mark.parametrize(
    "url",
    ["https://example.org/repo.git", "http://example.org/r", "git://example.org/r"],
)
def test_public_hosts_are_allowed(url):
    assert check_remote_url(url, resolve=PUBLIC) == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "'file://'"),
        ("/srv/repos/private", "a local path"),
        ("../other", "a local path"),
        ("ext::sh -c touch% /tmp/x", "transport"),
        ("ssh://git@example.org/r", "'ssh://'"),
        ("-uhttps://example.org", "characters"),
        ("https:///nohost", "no host"),
    ],
)
def test_local_and_dangerous_urls_are_refused(url, words):
    with pytest.raises(SourceError, match=words):
        check_remote_url(url, resolve=PUBLIC)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.17.0.2",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
    ],
)
def test_hosts_resolving_to_local_networks_are_refused(address):
    resolver = dns({"sneaky.example": ["93.184.215.14", address]})
    with pytest.raises(SourceError, match="local or private network"):
        check_remote_url("https://sneaky.example/repo", resolve=resolver)
    assert not is_public(address)


def test_the_operator_allow_list_admits_a_local_git_daemon():
    url = "git://127.0.0.1:9418/repo"
    resolver = dns({"127.0.0.1": ["127.0.0.1"]})
    with pytest.raises(SourceError):
        check_remote_url(url, resolve=resolver)
    assert check_remote_url(url, ["127.0.0.1"], resolve=resolver) == url
    assert check_remote_url(url, ["127.0.0.1:9418"], resolve=resolver) == url
