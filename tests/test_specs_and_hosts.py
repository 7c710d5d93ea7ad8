"""Launch specs in BinderHub's syntax, and the remote-host checks (pure: a fake resolver
stands in for DNS so the addresses are known)."""

from __future__ import annotations

import pytest

from binderbox.errors import SourceError
from binderbox.providers.hosts import ascii_host, check_remote_url, checked_address, is_public
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
        ("git@example.org:org/r.git", "an ssh address"),
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


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("::ffff:8.8.8.8", True),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::808:808", True),  # NAT64 to a public address
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 to 169.254.169.254 (cloud metadata)
        ("64:ff9b::7f00:1", False),
        ("64:ff9b:1::808:808", False),  # local-use NAT64: a translator on this network
        ("2002:808:808::1", True),  # 6to4 through a public relay address
        ("2002:c0a8:101::1", False),  # 6to4 embedding 192.168.1.1
        ("2002:7f00:1::1", False),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),  # Teredo: public server and client
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo client 192.0.2.45
        ("2001:0:a00:1:8000:63bf:f7f7:f7f7", False),  # Teredo server 10.0.0.1
        ("::7f00:1", False),  # IPv4-compatible ::127.0.0.1
        ("2606:4700::1", True),
    ],
)
def test_addresses_that_embed_ipv4_are_judged_by_what_they_embed(address, public):
    assert is_public(address) is public
    resolver = dns({"tunnel.example": [address]})
    if public:
        assert checked_address("https://tunnel.example/r", resolve=resolver).address == address
    else:
        with pytest.raises(SourceError, match="local or private network"):
            checked_address("https://tunnel.example/r", resolve=resolver)


def test_the_checked_address_is_the_one_to_connect_to():
    resolver = dns({"example.org": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    assert checked_address("https://EXAMPLE.org/r.git", resolve=resolver) == (
        "example.org",
        "93.184.215.14",
    )
    assert checked_address("example.org", 443, resolve=resolver).address == "93.184.215.14"
    # An IP literal is its own address: nothing is resolved.
    assert checked_address("git://127.0.0.1:9418/r", None, ["127.0.0.1"], resolve=dns({})) == (
        "127.0.0.1",
        "127.0.0.1",
    )


def test_every_address_is_judged_even_when_one_is_allowed():
    resolver = dns({"mixed.example": ["127.0.0.1", "10.0.0.5"]})
    with pytest.raises(SourceError, match=r"10\.0\.0\.5"):
        checked_address("http://mixed.example/r", None, ["127.0.0.1"], resolve=resolver)
    # A host the operator names is trusted whatever it resolves to, and still pinned.
    assert checked_address(
        "http://mixed.example:8080/r", None, ["mixed.example:8080"], resolve=resolver
    ) == ("mixed.example", "127.0.0.1")


def test_host_names_are_checked_in_the_form_curl_connects_to():
    assert ascii_host("Bücher.example") == "xn--bcher-kva.example"
    assert ascii_host("xn--zca.example") == "xn--zca.example"
    seen: list[str] = []

    def resolver(host: str) -> list[str]:
        seen.append(host)
        return ["93.184.215.14"]

    assert checked_address("https://bücher.example/r", resolve=resolver).host == (
        "xn--bcher-kva.example"
    )
    assert seen == ["xn--bcher-kva.example"]
    # IDNA 2003 (Python's resolver) says ss.example, IDNA 2008 (curl) xn--zca.example.
    for url in ("https://ß.example/r", "https://faß.example/r"):
        with pytest.raises(SourceError, match="differ between IDNA 2003 and IDNA 2008"):
            checked_address(url, resolve=resolver)
    for bad in ("https://☃.example/r", "https://a..b/r", "https://exa mple.org/r"):
        with pytest.raises(SourceError, match="not a valid host name"):
            checked_address(bad, resolve=resolver)
    assert seen == ["xn--bcher-kva.example"]
