"""detect(): one small fixture repository per repo2docker rule (pure: files in, a plan out)."""

import pytest

from binderbox.builder.detect import detect
from binderbox.builder.plan import AptPackage, BuildPlan, Requirements
from binderbox.errors import ConfigError

BINDER_DIRS = ["binder", ".binder"]


def config_error(repo) -> str:
    with pytest.raises(ConfigError) as info:
        detect(repo)
    return info.value.message


# --- binder/ and .binder/ -------------------------------------------------------------------


@pytest.mark.parametrize("binder", BINDER_DIRS)
def test_binder_dir_is_the_only_place_config_is_read_from(make_repo, binder):
    repo = make_repo(
        {
            f"{binder}/requirements.txt": "numpy\n",
            f"{binder}/apt.txt": "curl\n",
            "requirements.txt": "-e .\n",
            "apt.txt": "NOT A PACKAGE\n",
            "runtime.txt": "garbage\n",
            "postBuild": "#!/bin/sh\n",
        }
    )
    plan = detect(repo)
    assert plan.config_dir == binder
    assert plan.requirements == Requirements(path=f"{binder}/requirements.txt", local=False)
    assert plan.apt_packages == (AptPackage("curl"),)
    assert plan.python_version == ""
    assert plan.post_build == ""


def test_root_requirements_txt_ignored_when_binder_dir_exists(make_repo):
    repo = make_repo({"binder/apt.txt": "curl\n", "requirements.txt": "numpy\n"})
    assert detect(repo).requirements is None


def test_empty_binder_dir_ignores_every_root_file(make_repo):
    repo = make_repo(
        {
            "requirements.txt": "numpy\n",
            "apt.txt": "curl\n",
            "postBuild": "#!/bin/sh\n",
            "start": "#!/bin/sh\n",
            "setup.py": "",
            "environment.yml": "",
            "DESCRIPTION": "",
        }
    )
    (repo / "binder").mkdir()
    assert detect(repo) == BuildPlan(config_dir="binder")


def test_root_files_used_without_binder_dir(make_repo):
    repo = make_repo({"requirements.txt": "numpy\n", "apt.txt": "curl\n"})
    plan = detect(repo)
    assert plan.config_dir == ""
    assert plan.requirements == Requirements(path="requirements.txt", local=False)
    assert plan.apt_packages == (AptPackage("curl"),)


def test_file_named_binder_is_not_a_binder_dir(make_repo):
    repo = make_repo({"binder": "not a folder\n", "requirements.txt": "numpy\n"})
    plan = detect(repo)
    assert plan.config_dir == ""
    assert plan.requirements == Requirements(path="requirements.txt", local=False)


def test_both_binder_and_dot_binder_is_config_error(make_repo):
    repo = make_repo({"binder/apt.txt": "curl\n", ".binder/apt.txt": "curl\n"})
    message = config_error(repo)
    assert "'binder'" in message
    assert "'.binder'" in message


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_at_root_is_exclusive(make_repo):
    repo = make_repo(
        {
            "Dockerfile": "FROM scratch\n",
            "requirements.txt": "-e .\n",
            "apt.txt": "foo; touch /x\n",
            "runtime.txt": "garbage\n",
            "environment.yml": "",
            "postBuild": "#!/bin/sh\n",
            "setup.py": "",
        }
    )
    assert detect(repo) == BuildPlan(dockerfile="Dockerfile")


@pytest.mark.parametrize("binder", BINDER_DIRS)
def test_dockerfile_in_binder_dir_is_exclusive(make_repo, binder):
    repo = make_repo(
        {
            f"{binder}/Dockerfile": "FROM scratch\n",
            f"{binder}/apt.txt": "Foo\n",
            f"{binder}/Pipfile": "",
            f"{binder}/start": "#!/bin/sh\n",
        }
    )
    assert detect(repo) == BuildPlan(config_dir=binder, dockerfile=f"{binder}/Dockerfile")


def test_root_dockerfile_ignored_when_binder_dir_exists(make_repo):
    repo = make_repo({"Dockerfile": "FROM scratch\n", "binder/requirements.txt": "numpy\n"})
    plan = detect(repo)
    assert plan.dockerfile == ""
    assert plan.requirements == Requirements(path="binder/requirements.txt", local=False)


# --- setup.py / pyproject.toml ------------------------------------------------------------

PYPROJECT = '[project]\nname = "demo"\n\n[build-system]\nrequires = ["hatchling"]\n'


def test_setup_py_at_root_installs_the_project(make_repo):
    repo = make_repo({"setup.py": "from setuptools import setup\nsetup()\n"})
    assert detect(repo).install_project == "setup.py"


def test_pyproject_with_project_and_build_system_installs_the_project(make_repo):
    repo = make_repo({"pyproject.toml": PYPROJECT})
    assert detect(repo).install_project == "pyproject.toml"


@pytest.mark.parametrize(
    "text",
    [
        '[project]\nname = "demo"\n',
        '[build-system]\nrequires = ["hatchling"]\n',
        "[tool.ruff]\nline-length = 100\n",
        "",
    ],
    ids=["project-only", "build-system-only", "tool-only", "empty"],
)
def test_pyproject_without_project_and_build_system_is_not_installed(make_repo, text):
    repo = make_repo({"pyproject.toml": text})
    assert detect(repo).install_project == ""


def test_invalid_pyproject_toml_is_config_error(make_repo):
    repo = make_repo({"pyproject.toml": "[project\nname = \n"})
    assert "pyproject.toml" in config_error(repo)


@pytest.mark.parametrize("binder", BINDER_DIRS)
def test_setup_py_and_pyproject_ignored_with_binder_dir(make_repo, binder):
    repo = make_repo(
        {
            "setup.py": "",
            "pyproject.toml": "[project\n",  # invalid, but never read
            f"{binder}/apt.txt": "curl\n",
        }
    )
    assert detect(repo).install_project == ""


@pytest.mark.parametrize("name", ["setup.py", "pyproject.toml"])
def test_project_file_inside_binder_dir_is_not_installed(make_repo, name):
    repo = make_repo({f"binder/{name}": PYPROJECT if name == "pyproject.toml" else ""})
    assert detect(repo).install_project == ""


# --- requirements.txt ---------------------------------------------------------------------


def requirements_of(make_repo, text: str) -> Requirements:
    plan = detect(make_repo({"requirements.txt": text}))
    assert plan.requirements is not None
    return plan.requirements


def test_plain_requirements_are_not_local(make_repo):
    text = "numpy==1.26\n\n# the data stack\npandas>=2  # pinned later\nscipy; python_version>'3'\n"
    assert requirements_of(make_repo, text) == Requirements(path="requirements.txt", local=False)


@pytest.mark.parametrize(
    "line",
    [
        "-e .",
        "--editable .",
        "--editable=.",
        "-r other.txt",
        "--requirement other.txt",
        "--requirement=x",
        "-c constraints.txt",
        "--constraint=constraints.txt",
        "./pkg",
        "../sibling",
        "/abs/pkg",
        "~/pkg",
        "file:///srv/pkg",
        "pkg @ file:///x",
        "pkg[extra] @ file:///x",
    ],
)
def test_requirements_referring_to_repository_files_are_local(make_repo, line):
    assert requirements_of(make_repo, f"numpy\n{line}\n").local


@pytest.mark.parametrize(
    "line",
    [
        "python-editor==1.0.4",  # "-e" inside a package name
        "jupyter-events",
        "git+https://github.com/org/repo@v1.0#egg=repo",  # '@' in a URL, not file:
        "pkg @ https://example.org/pkg-1.0.tar.gz",
        "pkg @ git+https://github.com/org/pkg@main",
        "# -e .",
        "#-r other.txt",
        "requests  # -r other.txt",
        "numpy  # see ./docs",
    ],
)
def test_requirements_that_only_look_local_are_not_local(make_repo, line):
    assert not requirements_of(make_repo, f"numpy\n{line}\n").local


def test_requirement_at_file_url_without_spaces_is_local(make_repo):
    assert requirements_of(make_repo, "pkg@file:///x\n").local


@pytest.mark.parametrize("line", ["--find-links ./wheels", "-f ./wheels", "--find-links=wheels/"])
def test_find_links_to_a_repository_folder_is_local(make_repo, line):
    assert requirements_of(make_repo, f"{line}\nmypkg\n").local


@pytest.mark.parametrize("binder", BINDER_DIRS)
def test_requirements_path_is_relative_to_repository_root(make_repo, binder):
    repo = make_repo({f"{binder}/requirements.txt": "-r base.txt\n"})
    assert detect(repo).requirements == Requirements(path=f"{binder}/requirements.txt", local=True)


def test_non_utf8_requirements_txt_is_config_error(make_repo):
    repo = make_repo({})
    (repo / "requirements.txt").write_bytes(b"numpy\n\xff\xfe\n")
    assert "requirements.txt" in config_error(repo)


# --- runtime.txt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("python-3.11", "3.11"),
        ("python-3.13.2", "3.13"),
        ("python-3.12\n", "3.12"),
        ("", ""),
        ("python-3", ""),
    ],
)
def test_runtime_txt_python_version(make_repo, text, version):
    assert detect(make_repo({"runtime.txt": text})).python_version == version


def test_no_runtime_txt_means_base_python(make_repo):
    assert detect(make_repo({"requirements.txt": "numpy\n"})).python_version == ""


def test_runtime_txt_malformed_r_is_config_error(make_repo):
    message = config_error(make_repo({"runtime.txt": "r-latest\n"}))
    assert "runtime.txt" in message
    assert "r-latest" in message


@pytest.mark.parametrize("text", ["garbage", "3.11", "python3.11", "python-three", "java-11"])
def test_runtime_txt_garbage_is_config_error_naming_runtime_txt(make_repo, text):
    message = config_error(make_repo({"runtime.txt": text + "\n"}))
    assert message.startswith("runtime.txt:")
    assert text in message


def test_runtime_txt_error_names_binder_path(make_repo):
    message = config_error(make_repo({"binder/runtime.txt": "garbage\n"}))
    assert message.startswith("binder/runtime.txt:")


# --- apt.txt ---------------------------------------------------------------------------------


def test_apt_txt_names_versions_comments_and_blank_lines(make_repo):
    text = "# tools\ncurl\n\n   \ng++\nlibssl-dev\nr-base=4.2.2-1\nfoo=1:2.3-4\nbar=2.0~rc1+dfsg\n"
    assert detect(make_repo({"apt.txt": text})).apt_packages == (
        AptPackage("curl"),
        AptPackage("g++"),
        AptPackage("libssl-dev"),
        AptPackage("r-base", "4.2.2-1"),
        AptPackage("foo", "1:2.3-4"),
        AptPackage("bar", "2.0~rc1+dfsg"),
    )


def test_apt_txt_with_windows_line_endings(make_repo):
    plan = detect(make_repo({"apt.txt": "curl\r\nwget\r\n"}))
    assert plan.apt_packages == (AptPackage("curl"), AptPackage("wget"))


@pytest.mark.parametrize(
    "line",
    [
        "foo; touch /x",
        "-o Dpkg::Options::=--force-all",
        "$(curl x)",
        "foo bar",
        "`id`",
        "foo && rm -rf /",
        "../x",
        "Foo",
        "foo=",
        "foo|sh",
        "foo=1.0;id",
    ],
)
def test_apt_txt_injection_refused_naming_file_and_line(make_repo, line):
    message = config_error(make_repo({"apt.txt": f"# tools\ncurl\n{line}\nwget\n"}))
    assert message.startswith("apt.txt line 3:")
    assert repr(line) in message


def test_apt_txt_error_names_binder_path(make_repo):
    message = config_error(make_repo({".binder/apt.txt": "foo bar\n"}))
    assert message.startswith(".binder/apt.txt line 1:")


def test_apt_txt_inline_comment_ignored(make_repo):
    plan = detect(make_repo({"apt.txt": "curl  # for downloads\n"}))
    assert plan.apt_packages == (AptPackage("curl"),)


def test_non_utf8_apt_txt_is_config_error(make_repo):
    repo = make_repo({"binder/requirements.txt": "numpy\n"})
    (repo / "binder" / "apt.txt").write_bytes(b"curl\nlib\xe9\n")
    message = config_error(repo)
    assert "binder/apt.txt" in message
    assert "UTF-8" in message


# --- postBuild and start --------------------------------------------------------------------


@pytest.mark.parametrize("binder", BINDER_DIRS)
def test_post_build_and_start_detected(make_repo, binder):
    repo = make_repo(
        {
            f"{binder}/postBuild": "#!/bin/sh\necho hi\n",
            f"{binder}/start": '#!/bin/sh\nexport X=1\nexec "$@"\n',
        }
    )
    plan = detect(repo)
    assert plan.post_build == f"{binder}/postBuild"
    assert plan.start == f"{binder}/start"
    assert plan.warnings == ()


def test_post_build_and_start_at_root(make_repo):
    plan = detect(make_repo({"postBuild": "#!/bin/sh\n", "start": '#!/bin/sh\nexec "$@"\n'}))
    assert (plan.post_build, plan.start) == ("postBuild", "start")


def test_start_without_exec_gives_a_warning(make_repo):
    plan = detect(make_repo({"binder/start": "#!/bin/sh\nexport X=1\n"}))
    assert plan.start == "binder/start"
    assert len(plan.warnings) == 1
    assert "binder/start" in plan.warnings[0]
    assert 'exec "$@"' in plan.warnings[0]


def test_no_post_build_or_start(make_repo):
    plan = detect(make_repo({"requirements.txt": "numpy\n"}))
    assert (plan.post_build, plan.start, plan.warnings) == ("", "", ())


# --- ecosystems binderbox does not support yet ----------------------------------------------

UNSUPPORTED = [
    "Project.toml",
    "JuliaProject.toml",
    "REQUIRE",
    "default.nix",
]


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_ecosystem_at_root_is_config_error_naming_the_file(make_repo, name):
    message = config_error(make_repo({name: "", "requirements.txt": "numpy\n"}))
    assert message.startswith(f"{name}:")


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_ecosystem_in_binder_dir_is_config_error(make_repo, name):
    message = config_error(make_repo({f"binder/{name}": ""}))
    assert message.startswith(f"binder/{name}:")


def test_unsupported_ecosystem_at_root_ignored_with_binder_dir(make_repo):
    repo = make_repo({"environment.yml": "", "binder/requirements.txt": "numpy\n"})
    assert detect(repo).requirements == Requirements(path="binder/requirements.txt", local=False)


def test_description_at_root_without_binder_dir_is_an_r_package(make_repo):
    assert detect(make_repo({"DESCRIPTION": "Package: demo\n"})).r.package == "demo"


@pytest.mark.parametrize("files", [{"binder/DESCRIPTION": ""}, {"DESCRIPTION": "", "binder/x": ""}])
def test_description_counts_only_at_root_without_binder_dir(make_repo, files):
    plan = detect(make_repo(files))
    assert (plan.config_dir, plan.r) == ("binder", None)


# --- the folder itself -----------------------------------------------------------------------


def test_missing_folder_is_config_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="does not exist"):
        detect(missing)


def test_file_instead_of_folder_is_config_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigError):
        detect(path)


def test_empty_repository_gives_empty_plan(make_repo):
    assert detect(make_repo({})) == BuildPlan()
