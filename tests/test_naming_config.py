"""Image names and identity, settings and the choice of base suite (no Docker; the
identity test resolves a branch from a git daemon on 127.0.0.1)."""

import dataclasses
import re
from urllib.parse import quote

import pytest
from tests.conftest import commit_all

from binderbox.builder.pipeline import BuildRequest, choose_suite
from binderbox.config import Settings, load_settings
from binderbox.errors import ConfigError, UsageError
from binderbox.naming import IMAGE_SETTINGS, escape_slug, image_name_for, image_settings
from binderbox.service.launchflow import resolve_launch

# Docker's reference grammar (distribution/reference): lowercase path components, a tag of
# at most 128 word characters, dots and dashes.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
DOCKER_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
DOCKER_TAG = re.compile(r"^\w[\w.-]{0,127}$")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SLUGS = [
    "github.com/Org/Repo",
    "org/repo",
    "https://example.org/some.group/My_Repo.git",
    "/home/me/projects/demo",
    "ünïcode/répo",
    "UPPER",
    "",
    "---",
    "a" * 300,
    "plain",
]


def split_reference(reference: str) -> tuple[str, str]:
    name, _, tag = reference.rpartition(":")
    return name, tag


# --- image names ----------------------------------------------------------------------------

PLAIN = Settings(ca_bundle="")


def name_for(slug: str, commit: str = COMMIT, options=None, **settings) -> str:
    return image_name_for(PLAIN.with_overrides(**settings), slug, commit, options)


@pytest.mark.parametrize("slug", SLUGS)
def test_escape_slug_is_a_valid_name_component(slug):
    escaped = escape_slug(slug)
    assert DOCKER_NAME.match(escaped), escaped
    assert escaped == escaped.lower()
    assert len(escaped) <= 96 + 7


@pytest.mark.parametrize("slug", SLUGS)
@pytest.mark.parametrize("options", [{}, {"user_id": 1001, "appendix": "RUN echo hi"}])
def test_image_name_is_a_valid_docker_reference(slug, options):
    name, tag = split_reference(name_for(slug, options=options))
    assert DOCKER_NAME.match(name), name
    assert DOCKER_TAG.match(tag), tag
    assert len(tag) <= 128


def test_tag_stays_within_128_characters_for_the_longest_commit():
    _, tag = split_reference(name_for("org/repo", "f" * 200, {"user_id": 1001}))
    assert DOCKER_TAG.match(tag)
    assert len(tag) <= 128


def test_image_name_is_deterministic():
    options = {"user_name": "alice", "user_id": 1001}
    first = name_for("github.com/Org/Repo", options=options)
    again = name_for("github.com/Org/Repo", options=dict(reversed(options.items())))
    assert first == again
    assert escape_slug("github.com/Org/Repo") == escape_slug("github.com/Org/Repo")


def test_case_of_the_slug_gives_different_names():
    assert escape_slug("Org/Repo") != escape_slug("org/repo")
    assert name_for("Org/Repo") != name_for("org/repo")


def test_clean_slug_is_kept_as_is():
    assert escape_slug("plain") == "plain"
    assert name_for("plain") == f"binderbox-plain:{COMMIT}"


def test_default_options_add_no_digest():
    _, tag = split_reference(name_for("org/repo"))
    assert tag == COMMIT


def test_non_default_options_add_an_options_digest():
    _, tag = split_reference(name_for("org/repo", options={"user_id": 1001}))
    assert re.fullmatch(rf"{COMMIT}-o[0-9a-f]{{8}}", tag)
    other = name_for("org/repo", options={"user_id": 1002})
    assert split_reference(other)[1] != tag


def test_image_prefix_starts_the_name():
    assert name_for("org/repo", image_prefix="bb-v2-").startswith("bb-v2-org-repo-")


# --- image identity: one function, used by the service and the builder -----------------------

# A non-default value of every operator setting that changes what an image holds.
IMAGE_SETTING_VALUES = {
    "base_suite": "trixie",
    "base_image": "debian:bookworm",
    "cran_mirror": "https://cran.example.org",
    "compile_bytecode": True,
    "index_url": "https://mirror.example.org/pypi/simple",
}
# Settings that do not change an image's content, and why (decide for every new setting:
# here, or in naming.IMAGE_SETTINGS).
NOT_IMAGE_SETTINGS = {
    # How builds run or fail, not what they produce.
    "docker_cli", "build_timeout", "python_fallback", "r_version_fallback",
    # The base image's own recipe label decides when it is rebuilt.
    "debian_mirror",
    # Trust for reaching the network from builds; the bundle's path says nothing about
    # its content, and images must keep working when the operator moves it.
    "ca_bundle",
    # The name itself: the prefix starts it.
    "image_prefix",
    # Where records are fetched from: the content id names what was fetched.
    "doi_resolver", "zenodo_url", "zenodo_hosts", "figshare_url", "figshare_api_url",
    "figshare_hosts", "dataverse_hosts", "hydroshare_url", "ckan_hosts", "zenodo_token",
    "figshare_token", "dataverse_token", "hydroshare_token", "ckan_token",
    "content_max_bytes", "content_max_files", "record_metadata_max_bytes",
    # Limits on fetching a repository: the commit names what was fetched.
    "git_timeout", "git_low_speed_seconds", "git_max_bytes", "git_max_files",
}  # fmt: skip
SERVICE_SETTINGS_START = "service_host"  # everything from here on is about serving


def test_every_setting_is_decided_as_part_of_the_image_name_or_not():
    names = [f.name for f in dataclasses.fields(Settings)]
    build_settings = names[: names.index(SERVICE_SETTINGS_START)]
    undecided = set(build_settings) - set(IMAGE_SETTINGS) - NOT_IMAGE_SETTINGS
    assert not undecided, f"decide whether these settings change the image: {undecided}"
    assert set(IMAGE_SETTINGS) == set(IMAGE_SETTING_VALUES)
    for name in IMAGE_SETTINGS:
        assert name in build_settings, f"{name} is not a build setting"


@pytest.mark.parametrize("name", IMAGE_SETTINGS)
def test_each_image_setting_gives_its_own_name(name):
    changed = PLAIN.with_overrides(**{name: IMAGE_SETTING_VALUES[name]})
    assert image_settings(changed) == {name: IMAGE_SETTING_VALUES[name]}
    default = image_name_for(PLAIN, "org/repo", COMMIT)
    other = image_name_for(changed, "org/repo", COMMIT)
    assert other != default
    assert split_reference(other)[0] == split_reference(default)[0]
    names = {image_name_for(PLAIN.with_overrides(**{n: v}), "org/repo", COMMIT)
             for n, v in IMAGE_SETTING_VALUES.items()}  # fmt: skip
    assert len(names) == len(IMAGE_SETTINGS)


@pytest.mark.parametrize(
    "url",
    ["https://pypi.org/simple", "https://pypi.org/simple/", "http://pypi.python.org/simple"],
)
def test_pypi_under_any_of_its_addresses_is_the_default_index(url):
    settings = PLAIN.with_overrides(index_url=url)
    assert image_settings(settings) == {}
    assert image_name_for(settings, "org/repo", COMMIT) == image_name_for(PLAIN, "org/repo", COMMIT)


@pytest.fixture(scope="module")
def launchable_repo(git_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("identity") / "identity"
    work.mkdir()
    (work / "README.md").write_text("identity\n")
    commit = commit_all(work)
    return git_server.publish(work, "identity.git"), commit


@pytest.mark.parametrize("name", [None, *IMAGE_SETTINGS])
def test_the_service_and_the_builder_name_the_image_alike(launchable_repo, name):
    """What resolve_launch looks up is what build_repository tags, under every setting."""
    url, commit = launchable_repo
    settings = PLAIN.with_overrides(allowed_hosts="127.0.0.1")
    if name:
        settings = settings.with_overrides(**{name: IMAGE_SETTING_VALUES[name]})
    resolved = resolve_launch("git", f"{quote(url, safe='')}/main", settings)
    assert resolved.commit == commit
    # The build the service submits for it, and the name build_repository gives it.
    built = BuildRequest(source=resolved.source).image_for(settings, commit)
    assert resolved.image == built
    assert (resolved.image == image_name_for(PLAIN, resolved.source.slug(), commit)) == (
        name is None
    )


# --- settings -------------------------------------------------------------------------------


def write_settings(tmp_path, text: str):
    path = tmp_path / "binderbox.toml"
    path.write_text(text)
    return path


def test_load_settings_reads_the_toml_file(tmp_path):
    path = write_settings(
        tmp_path,
        'base_suite = "trixie"\nbuild_timeout = 60\nimage-prefix = "bb-"\n'
        'python_fallback = "fail"\nca_bundle = ""\n',
    )
    settings = load_settings(path, environ={})
    assert settings.base_suite == "trixie"
    assert settings.build_timeout == 60
    assert settings.image_prefix == "bb-"
    assert settings.python_fallback == "fail"
    assert settings.ca_bundle == ""


def test_defaults_without_file_or_environment():
    settings = load_settings(environ={"BINDERBOX_CA_BUNDLE": ""})
    assert settings.base_suite == "bookworm"
    assert settings.image_prefix == "binderbox-"
    assert settings.build_timeout == 3600
    assert settings.python_fallback == "nearest"


def test_environment_overrides_the_file(tmp_path):
    path = write_settings(tmp_path, 'build_timeout = 60\nbase_suite = "trixie"\n')
    settings = load_settings(path, environ={"BINDERBOX_BUILD_TIMEOUT": "90"})
    assert settings.build_timeout == 90
    assert settings.base_suite == "trixie"


def test_binderbox_config_variable_names_the_file(tmp_path):
    path = write_settings(tmp_path, 'image_prefix = "from-file-"\n')
    settings = load_settings(environ={"BINDERBOX_CONFIG": str(path)})
    assert settings.image_prefix == "from-file-"


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("build_timeout", "soon", ["build_timeout", "'soon'"]),
        ("build_timeout", "0", ["build_timeout", "positive"]),
        ("python_fallback", "maybe", ["python_fallback", "'nearest'", "'fail'"]),
        ("ca_bundle", "/nonexistent/ca.crt", ["/nonexistent/ca.crt", "does not exist"]),
    ],
)
def test_bad_environment_value_is_usage_error(name, value, words):
    with pytest.raises(UsageError) as info:
        load_settings(environ={f"BINDERBOX_{name.upper()}": value})
    assert all(word in info.value.message for word in words), info.value.message


def test_bad_value_in_the_file_is_usage_error(tmp_path):
    path = write_settings(tmp_path, 'build_timeout = "soon"\n')
    with pytest.raises(UsageError, match="build_timeout"):
        load_settings(path, environ={})


@pytest.mark.parametrize("text", ["build_timeout = true\n", 'docker_cli = ["docker", "-H", "x"]\n'])
def test_wrong_toml_type_is_usage_error(tmp_path, text):
    with pytest.raises(UsageError):
        load_settings(write_settings(tmp_path, text), environ={})


def test_unknown_key_in_the_file_is_usage_error(tmp_path):
    path = write_settings(tmp_path, 'base_sweet = "trixie"\n')
    with pytest.raises(UsageError) as info:
        load_settings(path, environ={})
    assert "base_sweet" in info.value.message
    assert str(path) in info.value.message


def test_missing_file_is_usage_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(UsageError) as info:
        load_settings(missing, environ={})
    assert str(missing) in info.value.message


def test_invalid_toml_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not valid TOML"):
        load_settings(write_settings(tmp_path, "base_suite = \n"), environ={})


def test_folder_instead_of_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError):
        load_settings(tmp_path, environ={})


def test_with_overrides_validates():
    settings = load_settings(environ={"BINDERBOX_CA_BUNDLE": ""})
    assert settings.with_overrides(build_timeout=5, base_image=None).build_timeout == 5
    with pytest.raises(UsageError):
        settings.with_overrides(python_fallback="never")


# --- choose_suite ---------------------------------------------------------------------------


def test_no_runtime_gives_the_default_suite():
    assert choose_suite("", Settings(ca_bundle="")) == ("bookworm", "")
    assert choose_suite("", Settings(ca_bundle="", base_suite="trixie")) == ("trixie", "")


@pytest.mark.parametrize(("version", "suite"), [("3.13", "trixie"), ("3.11", "bookworm")])
def test_shipped_python_picks_its_suite(version, suite):
    assert choose_suite(version, Settings(ca_bundle="")) == (suite, "")


def test_unshipped_python_picks_the_nearest_with_a_warning():
    suite, warning = choose_suite("3.8", Settings(ca_bundle=""))
    assert suite == "bookworm"
    assert "3.8" in warning
    assert "3.11" in warning


def test_newer_unshipped_python_picks_the_newest_suite():
    suite, warning = choose_suite("3.14", Settings(ca_bundle=""))
    assert suite == "trixie"
    assert "3.14" in warning


def test_unshipped_python_with_fallback_fail_is_config_error():
    with pytest.raises(ConfigError) as info:
        choose_suite("3.8", Settings(ca_bundle="", python_fallback="fail"))
    assert "3.8" in info.value.message
    assert "runtime.txt" in info.value.message


@pytest.mark.parametrize(
    ("requires", "suite"),
    [(">=3.10", "bookworm"), (">=3.12", "trixie"), ("<3.12", "bookworm"), ("~=3.13.0", "trixie")],
)
def test_python_range_picks_the_default_suite_or_the_newest_that_fits(requires, suite):
    assert choose_suite("", Settings(ca_bundle=""), requires) == (suite, "")


def test_python_range_nothing_fits():
    suite, warning = choose_suite("", Settings(ca_bundle=""), ">=3.14")
    assert suite == "bookworm" and ">=3.14" in warning
    with pytest.raises(ConfigError, match=r">=3\.14"):
        choose_suite("", Settings(ca_bundle="", python_fallback="fail"), ">=3.14")


def test_shipped_python_with_fallback_fail_is_fine():
    assert choose_suite("3.13", Settings(ca_bundle="", python_fallback="fail")) == ("trixie", "")


@pytest.mark.parametrize("prefix", ["Binder-", "-x", "has space", "a:b"])
def test_image_prefix_must_make_valid_image_names(prefix):
    with pytest.raises(UsageError, match="image_prefix"):
        load_settings(environ={"BINDERBOX_IMAGE_PREFIX": prefix})
