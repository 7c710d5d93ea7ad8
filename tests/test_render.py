"""render(): the Dockerfile text for plans built directly (pure: no Docker)."""

import re
import shlex

import pytest

from binderbox.builder import lock, stack
from binderbox.builder.plan import AptPackage, BuildPlan, Requirements, RSetup
from binderbox.builder.render import (
    ENTRYPOINT_SCRIPT,
    ImageOptions,
    render,
    system_bootstrap_command,
)
from binderbox.errors import UsageError

BASE = "binderbox/base:bookworm-20250101"
FULL_PLAN = BuildPlan(
    config_dir="binder",
    apt_packages=(AptPackage("curl"), AptPackage("libssl-dev", "3.0.11-1")),
    requirements=Requirements("binder/requirements.txt", local=False),
    post_build="binder/postBuild",
    start="binder/start",
)


def dockerfile(plan=FULL_PLAN, **options) -> str:
    return render(plan, ImageOptions(base_image=BASE, **options)).dockerfile


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def index(lines: list[str], needle: str) -> int:
    """Position of the only line containing ``needle``."""
    found = [i for i, line in enumerate(lines) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


def server_stack_line(text: str) -> str:
    return lines_of(text)[index(lines_of(text), "jupyterlab==")]


# --- cache-first order ----------------------------------------------------------------------


def test_binderbox_bases_already_hold_the_server_stack_and_user():
    text = dockerfile()
    assert "jupyterlab==" not in text
    assert "useradd" not in text


def test_layers_are_ordered_cache_first():
    lines = lines_of(dockerfile(foreign_base=True))
    server = index(lines, "jupyterlab==")
    apt = index(lines, "apt-get install -y --no-install-recommends curl")
    deps_copy = index(lines, "repo/binder/requirements.txt /tmp/binderbox-deps/")
    deps_install = index(lines, "-r /tmp/binderbox-deps/requirements.txt --no-build")
    full_copy = index(lines, "COPY --chown=1000:1000 repo/ ")
    post_build = index(lines, "./binder/postBuild")
    assert server < apt < deps_copy < deps_install < full_copy < post_build
    assert lines[server].startswith("RUN ")
    assert lines[apt].startswith("RUN ")
    assert lines[post_build].startswith("RUN ")


def test_requirements_copy_takes_only_the_requirements_file():
    lines = lines_of(dockerfile())
    copies = [line for line in lines if line.startswith("COPY") and " repo/" in line]
    assert copies == [
        "COPY --chown=1000:1000 repo/binder/requirements.txt /tmp/binderbox-deps/requirements.txt",
        "COPY --chown=1000:1000 repo/ /home/jovyan/",
    ]


def test_local_requirements_installed_after_the_full_copy():
    plan = BuildPlan(requirements=Requirements("requirements.txt", local=True))
    text = dockerfile(plan)
    lines = lines_of(text)
    assert "/tmp/binderbox-deps" not in text
    full_copy = index(lines, "COPY --chown=1000:1000 repo/ /home/jovyan/")
    workdir = index(lines, "WORKDIR /home/jovyan")
    install = index(
        lines, "pip install --python /srv/venv/bin/python -r requirements.txt --no-build"
    )
    assert full_copy < workdir < install


def test_project_installed_after_the_full_copy():
    lines = lines_of(dockerfile(BuildPlan(install_project="pyproject.toml")))
    full_copy = index(lines, "COPY --chown=1000:1000 repo/ ")
    install = index(lines, f"uv pip install --python {stack.VENV}/bin/python .")
    assert full_copy < install


def test_server_stack_line_is_byte_identical_for_different_plans():
    other = BuildPlan(
        apt_packages=(AptPackage("git"),),
        requirements=Requirements("requirements.txt", local=True),
        install_project="setup.py",
    )
    first, second = dockerfile(FULL_PLAN, foreign_base=True), dockerfile(other, foreign_base=True)
    assert first != second
    assert server_stack_line(first) == server_stack_line(second)
    # Everything up to that line is shared too, so the layer is reused.
    cut = index(lines_of(first), "jupyterlab==") + 1
    assert lines_of(first)[:cut] == lines_of(second)[:cut]


def test_server_stack_line_installs_the_pinned_stack():
    line = server_stack_line(dockerfile(foreign_base=True))
    assert line.startswith("RUN --mount=type=cache,")
    assert all(pin in line for pin in stack.SERVER_STACK)


# --- quoting and options --------------------------------------------------------------------


def test_apt_package_names_are_shell_quoted():
    plan = BuildPlan(
        apt_packages=(
            AptPackage("curl"),
            AptPackage("foo; rm -rf /"),
            AptPackage("bar", "2.0~rc1"),
        )
    )
    lines = lines_of(dockerfile(plan))
    line = lines[index(lines, "apt-get install")]
    assert "'foo; rm -rf /'" in line
    assert "'bar=2.0~rc1'" in line
    names = line.split("--no-install-recommends ", 1)[1]
    assert shlex.split(names) == ["curl", "foo; rm -rf /", "bar=2.0~rc1"]


def test_apt_step_runs_as_root_then_back_to_the_user():
    lines = lines_of(dockerfile())
    apt = index(lines, "apt-get install")
    assert lines[apt - 1] == "USER root"
    assert lines[apt + 1] == "USER 1000"


def test_no_apt_step_without_apt_packages():
    assert "apt-get" not in dockerfile(BuildPlan())


def test_user_options_appear_in_useradd_env_and_workdir():
    text = dockerfile(user_id=1234, user_name="alice", target_repo_dir="/srv/repo")
    lines = lines_of(text)
    useradd = lines[index(lines, "useradd")]
    assert "groupadd --non-unique --gid 1234 alice" in useradd
    assert (
        "useradd --non-unique --uid 1234 --gid 1234 --create-home --shell /bin/bash alice"
        in useradd
    )
    assert "install -d -o 1234 -g 1234 /home/alice /srv/repo" in useradd
    # The base's Python belongs to uid 1000; this user must own it.
    assert "chown -R 1234:1234 /srv/venv" in useradd
    env = lines[index(lines, "ENV NB_USER=")]
    assert "NB_USER=alice NB_UID=1234 USER=alice HOME=/home/alice REPO_DIR=/srv/repo" in env
    assert "WORKDIR /srv/repo" in lines
    assert "COPY --chown=1234:1234 repo/ /srv/repo/" in lines
    assert "USER 1234" in lines
    assert "ENV BINDERBOX_START=/srv/repo/binder/start" in lines


def test_repository_goes_to_home_by_default():
    lines = lines_of(dockerfile())
    assert "WORKDIR /home/jovyan" in lines
    assert "COPY --chown=1000:1000 repo/ /home/jovyan/" in lines
    assert "REPO_DIR=/home/jovyan " in lines[index(lines, "ENV NB_USER=")]


@pytest.mark.parametrize(
    "options",
    [
        {"user_id": 0},
        {"user_id": -1},
        {"user_id": 65535},
        {"user_name": "root"},
        {"user_name": "Bad Name"},
        {"user_name": ""},
        {"user_name": "a" * 33},
        {"user_name": "x;id"},
        {"target_repo_dir": "relative"},
        {"target_repo_dir": "/a/../b"},
        {"target_repo_dir": "/"},
        {"target_repo_dir": "/srv/$(id)"},
        {"target_repo_dir": "/srv repo"},
    ],
    ids=str,
)
def test_invalid_options_raise_usage_error(options):
    with pytest.raises(UsageError):
        dockerfile(**options)


@pytest.mark.parametrize(
    "options", [{"user_name": "jovyan\n"}, {"target_repo_dir": "/srv/repo\n"}], ids=str
)
def test_option_with_trailing_newline_raises_usage_error(options):
    with pytest.raises(UsageError):
        dockerfile(**options)


@pytest.mark.parametrize("repo_dir", ["//", "/.", "/./"])
def test_target_repo_dir_spelling_root_raises_usage_error(repo_dir):
    with pytest.raises(UsageError):
        dockerfile(target_repo_dir=repo_dir)


def test_plan_with_its_own_dockerfile_is_not_rendered():
    with pytest.raises(ValueError):
        dockerfile(BuildPlan(dockerfile="Dockerfile"))


# --- fixed parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"foreign_base": True, "with_ca_bundle": True, "appendix": "RUN echo hi"}],
    ids=["default", "everything"],
)
def test_no_syntax_directive_ever(options):
    text = dockerfile(**options)
    assert not re.search(r"^\s*#\s*syntax\s*=", text, re.IGNORECASE | re.MULTILINE)
    assert text.startswith(f"FROM {BASE}\n")


def test_entrypoint_uses_tini_and_the_entrypoint_script():
    recipe = render(FULL_PLAN, ImageOptions(base_image=BASE))
    lines = lines_of(recipe.dockerfile)
    assert lines[-2] == (
        'ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/binderbox-entrypoint"]'
    )
    assert lines[-1] == 'CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser"]'
    assert "COPY binderbox/entrypoint /usr/local/bin/binderbox-entrypoint" in lines
    assert recipe.support_files["entrypoint"] == ENTRYPOINT_SCRIPT
    assert set(recipe.support_files) == {"entrypoint", lock.COLLECTOR}
    assert ENTRYPOINT_SCRIPT.rstrip().endswith('exec "$@"')


def test_binderbox_start_env_only_when_start_exists():
    assert "ENV BINDERBOX_START=/home/jovyan/binder/start" in lines_of(dockerfile())
    without_start = BuildPlan(post_build="postBuild")
    assert "BINDERBOX_START" not in dockerfile(without_start)


def test_start_without_post_build_is_made_executable_only():
    lines = lines_of(dockerfile(BuildPlan(start="start")))
    assert "RUN chmod +x start" in lines
    assert not any("./start" in line for line in lines)


def test_post_build_is_made_executable_and_run():
    lines = lines_of(dockerfile(BuildPlan(config_dir=".binder", post_build=".binder/postBuild")))
    assert "RUN chmod +x .binder/postBuild && ./.binder/postBuild" in lines


def test_appendix_comes_after_post_build():
    text = dockerfile(appendix="\nRUN echo appended\n")
    lines = lines_of(text)
    post_build = index(lines, "./binder/postBuild")
    appendix = index(lines, "RUN echo appended")
    entrypoint = index(lines, "ENTRYPOINT")
    assert post_build < appendix < entrypoint
    assert lines[appendix + 1 : appendix + 3] == ["USER 1000", "WORKDIR /home/jovyan"]


def test_blank_appendix_adds_nothing():
    assert dockerfile(appendix="  \n") == dockerfile()


def test_foreign_base_adds_the_bootstrap_step():
    lines = lines_of(dockerfile(foreign_base=True))
    bootstrap = index(lines, system_bootstrap_command())
    uv = index(lines, f"uv=={stack.UV_VERSION}")
    assert bootstrap < uv < index(lines, "jupyterlab==")
    plain = dockerfile()
    assert system_bootstrap_command() not in plain
    assert f"uv=={stack.UV_VERSION}" not in plain


def test_ca_bundle_is_copied_and_trusted_before_any_download():
    lines = lines_of(dockerfile(with_ca_bundle=True))
    copy = index(
        lines, "COPY binderbox/extra-ca.crt /usr/local/share/ca-certificates/binderbox-extra.crt"
    )
    trust = index(lines, "cat /usr/local/share/ca-certificates/binderbox-extra.crt >>")
    assert copy < trust
    foreign = lines_of(dockerfile(with_ca_bundle=True, foreign_base=True))
    assert index(foreign, "binderbox-extra.crt >>") < index(foreign, "jupyterlab==")
    assert "extra-ca.crt" not in dockerfile()


@pytest.mark.parametrize(
    ("plan", "options"),
    [
        (BuildPlan(), {}),
        (FULL_PLAN, {"foreign_base": True, "with_ca_bundle": True}),
        (
            BuildPlan(
                requirements=Requirements("requirements.txt", local=True),
                install_project="setup.py",
                start="start",
            ),
            {},
        ),
    ],
    ids=["empty", "full", "local"],
)
def test_every_run_has_a_described_step(plan, options):
    recipe = render(plan, ImageOptions(base_image=BASE, **options))
    runs = [line for line in lines_of(recipe.dockerfile) if line.startswith("RUN ")]
    assert len(recipe.steps) == len(runs)
    for step, run in zip(recipe.steps, runs, strict=True):
        assert step.description.strip()
        assert step.marker
        assert step.marker in run


def test_repository_packages_are_compiled_only_on_request():
    assert "UV_COMPILE_BYTECODE=0" in dockerfile()
    assert "UV_COMPILE_BYTECODE=1" in dockerfile(compile_bytecode=True)


# --- uv's cache -----------------------------------------------------------------------------


def uv_cache_settings(lines: list[str]) -> list[tuple[int, str]]:
    """(line, value) of each UV_CACHE_DIR an ENV instruction sets."""
    return [
        (i, m[1])
        for i, line in enumerate(lines)
        if line.startswith("ENV ")
        for m in [re.search(r"\bUV_CACHE_DIR=(\S+)", line)]
        if m
    ]


EVERY_UV_STEP = BuildPlan(
    requirements=Requirements("requirements.txt", local=True),
    install_project="setup.py",
    r=RSetup(version="4.2", snapshot="2023-01-01", install_script="install.R"),
    post_build="postBuild",
    start="start",
)


@pytest.mark.parametrize(
    ("options", "home"),
    [
        ({}, "/home/jovyan"),
        ({"foreign_base": True, "locked_python": ("six==1.16.0",)}, "/home/jovyan"),
        ({"user_id": 1234, "user_name": "alice"}, "/home/alice"),
    ],
    ids=["default", "foreign-locked", "other-user"],
)
def test_uv_cache_is_the_mount_in_install_steps_and_the_users_after_them(options, home):
    lines = lines_of(dockerfile(EVERY_UV_STEP, appendix="RUN uv --version", **options))
    (build, build_value), (user, user_value) = uv_cache_settings(lines)
    assert build_value == stack.UV_CACHE
    # What the session's uv (and postBuild's) uses: a folder the user can create.
    assert user_value == f"{home}/.cache/uv"
    mounted = [i for i, line in enumerate(lines) if f"target={stack.UV_CACHE}," in line]
    assert mounted and build < min(mounted) and max(mounted) < user
    assert index(lines, "uv pip install --python /srv/venv/bin/python .") < user
    for repository_code in ("install.R", "./postBuild", "RUN uv --version"):
        assert user < index(lines, repository_code)
