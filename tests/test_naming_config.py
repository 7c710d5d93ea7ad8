"""Image names, settings and the choice of base suite (pure: no Docker)."""

import re

import pytest

from binderbox.build.pipeline import choose_suite
from binderbox.config import Settings, load_settings
from binderbox.errors import ConfigError, UsageError
from binderbox.naming import escape_slug, image_name_for

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


@pytest.mark.parametrize("slug", SLUGS)
def test_escape_slug_is_a_valid_name_component(slug):
    escaped = escape_slug(slug)
    assert DOCKER_NAME.match(escaped), escaped
    assert escaped == escaped.lower()
    assert len(escaped) <= 96 + 7


@pytest.mark.parametrize("slug", SLUGS)
@pytest.mark.parametrize("options", [{}, {"user_id": 1001, "appendix": "RUN echo hi"}])
def test_image_name_is_a_valid_docker_reference(slug, options):
    name, tag = split_reference(image_name_for("binderbox-", slug, COMMIT, options))
    assert DOCKER_NAME.match(name), name
    assert DOCKER_TAG.match(tag), tag
    assert len(tag) <= 128


def test_tag_stays_within_128_characters_for_the_longest_commit():
    reference = image_name_for("binderbox-", "org/repo", "f" * 200, {"user_id": 1001})
    _, tag = split_reference(reference)
    assert DOCKER_TAG.match(tag)
    assert len(tag) <= 128


def test_image_name_is_deterministic():
    options = {"user_name": "alice", "user_id": 1001}
    first = image_name_for("binderbox-", "github.com/Org/Repo", COMMIT, options)
    again = image_name_for(
        "binderbox-", "github.com/Org/Repo", COMMIT, dict(reversed(options.items()))
    )
    assert first == again
    assert escape_slug("github.com/Org/Repo") == escape_slug("github.com/Org/Repo")


def test_case_of_the_slug_gives_different_names():
    assert escape_slug("Org/Repo") != escape_slug("org/repo")
    upper = image_name_for("binderbox-", "Org/Repo", COMMIT, {})
    lower = image_name_for("binderbox-", "org/repo", COMMIT, {})
    assert upper != lower


def test_clean_slug_is_kept_as_is():
    assert escape_slug("plain") == "plain"
    assert image_name_for("binderbox-", "plain", COMMIT, {}) == f"binderbox-plain:{COMMIT}"


def test_default_options_add_no_digest():
    _, tag = split_reference(image_name_for("binderbox-", "org/repo", COMMIT, {}))
    assert tag == COMMIT


def test_non_default_options_add_an_options_digest():
    _, tag = split_reference(image_name_for("binderbox-", "org/repo", COMMIT, {"user_id": 1001}))
    assert re.fullmatch(rf"{COMMIT}-o[0-9a-f]{{8}}", tag)
    other = image_name_for("binderbox-", "org/repo", COMMIT, {"user_id": 1002})
    assert split_reference(other)[1] != tag


def test_image_prefix_starts_the_name():
    assert image_name_for("bb-v2-", "org/repo", COMMIT, {}).startswith("bb-v2-org-repo-")


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
