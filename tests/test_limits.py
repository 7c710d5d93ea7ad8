"""Quotas, bans and the rate limit (pure: memory sizes and clocks are given)."""

from __future__ import annotations

import pytest

from binderbox.config import Settings
from binderbox.errors import UsageError
from binderbox.service.limits import LaunchRefused, Limits, RateLimiter, total_quota

GIB = 1024**3
IMAGE = "binderbox-git-example-org-repo-abc123:" + "a" * 40


def test_total_quota_defaults_to_what_memory_holds():
    settings = Settings(ca_bundle="")
    assert total_quota(settings, memory=24 * GIB) == 22  # 1 GiB each, 2 GiB kept
    assert total_quota(settings.with_overrides(session_mem_guarantee="512M"), 24 * GIB) == 44
    assert total_quota(settings, memory=1 * GIB) == 1
    assert total_quota(settings.with_overrides(total_quota=5), memory=24 * GIB) == 5


def test_per_repository_quota_counts_every_commit_of_the_repository():
    limits = Limits(per_repo=2, total=10)
    other_commit = IMAGE.rsplit(":", 1)[0] + ":" + "b" * 40
    limits.check_quota(IMAGE, [IMAGE, "binderbox-other:1"], "org/repo/main")
    with pytest.raises(LaunchRefused, match=r"Too many users running org/repo/main! Try"):
        limits.check_quota(IMAGE, [IMAGE, other_commit], "org/repo/main")


def test_total_quota():
    limits = Limits(per_repo=100, total=2)
    with pytest.raises(LaunchRefused, match="Too many users on this binderbox"):
        limits.check_quota(IMAGE, ["binderbox-a:1", "binderbox-b:1"], "org/repo/main")


def test_banned_specs_and_networks():
    limits = Limits.from_settings(
        Settings(
            ca_bundle="",
            banned_specs="^gh/evil/.*, crypto-?miner",
            banned_networks="10.0.0.0/8, 2001:db8::/32",
        )
    )
    with pytest.raises(LaunchRefused, match="temporarily disabled"):
        limits.check_spec("gh", "evil/repo/HEAD")
    with pytest.raises(LaunchRefused):
        limits.check_spec("git", "https%3A%2F%2Fx.org%2Fcryptominer/main")
    limits.check_spec("gh", "good/repo/HEAD")
    assert limits.address_banned("10.2.3.4") and limits.address_banned("2001:db8::1")
    assert not limits.address_banned("127.0.0.1") and not limits.address_banned("not-an-ip")


def test_allowed_specs_admit_only_the_chosen_repositories():
    limits = Limits.from_settings(Settings(ca_bundle="", allowed_specs="^gh/workshop-org/"))
    limits.check_spec("gh", "workshop-org/day1/HEAD")
    with pytest.raises(LaunchRefused, match="only launches the repositories its admins chose"):
        limits.check_spec("gh", "someone/else/HEAD")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("banned_specs", "(unclosed"), ("allowed_specs", "[x"), ("banned_networks", "10.0.0.0/99")],
)
def test_bad_ban_settings_are_usage_errors(setting, value):
    with pytest.raises(UsageError, match=setting):
        Limits.from_settings(Settings(ca_bundle="", **{setting: value}))


def test_rate_limiter_is_a_sliding_window_per_address():
    limiter = RateLimiter(limit=2, period=60)
    assert limiter.retry_after("a", now=0) == 0
    assert limiter.retry_after("a", now=10) == 0
    assert limiter.retry_after("a", now=20) == pytest.approx(40)
    assert limiter.retry_after("b", now=20) == 0  # another address
    assert limiter.retry_after("a", now=61) == 0  # the first request left the window
    assert RateLimiter(limit=0).retry_after("a") == 0  # off


def test_build_tokens_are_bound_to_a_spec_and_an_address_and_expire(tmp_path):
    from binderbox.service import buildtoken

    secret = buildtoken.load_secret(tmp_path)
    assert buildtoken.load_secret(tmp_path) == secret  # kept for the next start
    assert oct((tmp_path / "build-token-secret").stat().st_mode & 0o777) == "0o600"
    spec, here = "gh/org/repo/HEAD", "192.0.2.7"
    token = buildtoken.issue(secret, spec, here, now=1000)
    assert buildtoken.valid(secret, token, spec, here, now=1000)
    assert buildtoken.expiry(secret, token, spec, here, now=1000) == 1000 + 600
    assert not buildtoken.valid(secret, token, "gh/org/other/HEAD", here, now=1000)
    assert not buildtoken.valid(secret, token, spec, "192.0.2.8", now=1000)
    assert not buildtoken.valid(secret, token, spec, here, now=1000 + 601)
    assert not buildtoken.valid(b"another secret", token, spec, here, now=1000)
    payload, _, signature = token.partition(".")
    assert not buildtoken.valid(secret, payload + "." + "0" * len(signature), spec, here)
    assert not buildtoken.valid(secret, "garbage", spec, here)
    # Two page loads get two tokens (each with its own allowance).
    assert buildtoken.issue(secret, spec, here, now=1000) != token
    assert buildtoken.valid(secret, buildtoken.issue(secret, spec, here, seconds=5), spec, here)


def test_a_token_goes_past_the_rate_limit_only_a_few_times():
    from binderbox.service.buildtoken import TokenUses

    uses = TokenUses(uses=3, max_tokens=2)
    assert [uses.take("p.a", expires=100, now=0) for _ in range(4)] == [True, True, True, False]
    assert uses.take("p.b", expires=100, now=0)
    # Remembering no more than max_tokens: a third token gets no pass until others expire.
    assert not uses.take("p.c", expires=100, now=0)
    assert uses.take("p.c", expires=300, now=150)


def test_ipv6_clients_are_counted_per_slash_64():
    from binderbox.service.limits import address_bucket

    assert address_bucket("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_bucket("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert address_bucket("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_bucket("::ffff:192.0.2.9") == "192.0.2.9"  # an IPv4 client after all
    assert address_bucket("192.0.2.9") == "192.0.2.9"
    limiter = RateLimiter(limit=2, period=60)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):
        assert limiter.retry_after(address_bucket(host), now=0) == 0
    # A third address of the same /64 is the same client.
    assert limiter.retry_after(address_bucket("2001:db8:1:2::3"), now=0) > 0
    assert limiter.retry_after(address_bucket("2001:db8:1:9::3"), now=0) == 0


def test_forwarded_addresses_count_only_from_trusted_proxies():
    from binderbox.service.limits import client_address, parse_trusted_proxies

    trusted = parse_trusted_proxies("10.0.0.1, 10.9.0.0/16")
    forged = {"x-forwarded-for": "203.0.113.5", "x-real-ip": "203.0.113.6"}
    # Anyone else may write these headers: the peer is the client.
    assert client_address("198.51.100.7", forged, trusted) == "198.51.100.7"
    assert client_address("198.51.100.7", forged, []) == "198.51.100.7"
    # Behind a trusted proxy, the right-most address that is not a trusted proxy.
    chain = {"x-forwarded-for": "1.1.1.1, 203.0.113.5, 10.9.3.4"}
    assert client_address("10.0.0.1", chain, trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", {"x-real-ip": "203.0.113.6"}, trusted) == "203.0.113.6"
    forwarded = {"forwarded": 'for=1.1.1.1, for="[2001:db8::7]:4711";proto=https'}
    assert client_address("10.0.0.1", forwarded, trusted) == "2001:db8::7"
    assert client_address("10.0.0.1", {"forwarded": "for=192.0.2.3:80"}, trusted) == "192.0.2.3"
    # Something that is no address, where the proxy writes the client: the proxy counts.
    assert client_address("10.0.0.1", {"x-forwarded-for": "junk"}, trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", {}, trusted) == "10.0.0.1"
    with pytest.raises(UsageError, match="trusted_proxies"):
        parse_trusted_proxies("10.0.0.1, not-a-network")
    with pytest.raises(UsageError, match="trusted_proxies"):
        Settings(ca_bundle="").with_overrides(trusted_proxies="proxy.example.org")


def test_in_flight_caps_count_per_address():
    from binderbox.service.limits import InFlight

    caps = InFlight(2)
    assert caps.acquire("a") and caps.acquire("a") and not caps.acquire("a")
    assert caps.acquire("b")
    caps.release("a")
    assert caps["a"] == 1 and caps.acquire("a")
    assert all(InFlight(0).acquire("a") for _ in range(100))  # 0: no cap
