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


def test_build_tokens_are_bound_to_a_spec_and_expire(tmp_path):
    from binderbox.service import buildtoken

    secret = buildtoken.load_secret(tmp_path)
    assert buildtoken.load_secret(tmp_path) == secret  # kept for the next start
    assert oct((tmp_path / "build-token-secret").stat().st_mode & 0o777) == "0o600"
    token = buildtoken.issue(secret, "gh/org/repo/HEAD", now=1000)
    assert buildtoken.valid(secret, token, "gh/org/repo/HEAD", now=1000)
    assert not buildtoken.valid(secret, token, "gh/org/other/HEAD", now=1000)
    assert not buildtoken.valid(secret, token, "gh/org/repo/HEAD", now=1000 + 3601)
    assert not buildtoken.valid(b"another secret", token, "gh/org/repo/HEAD", now=1000)
    payload, _, signature = token.partition(".")
    assert not buildtoken.valid(secret, payload + "." + "0" * len(signature), "gh/org/repo/HEAD")
    assert not buildtoken.valid(secret, "garbage", "gh/org/repo/HEAD")
