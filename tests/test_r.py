"""R support without Docker: detection, runtime.txt's r- forms, the rendered layers,
the R version warnings and the CRAN mirror setting."""

import shlex

import pytest

from binderbox.builder import r_support
from binderbox.builder.detect import detect
from binderbox.builder.pipeline import BuildRequest, choose_r_suite
from binderbox.builder.plan import AptPackage, BuildPlan, Requirements, RSetup
from binderbox.builder.render import ImageOptions, render
from binderbox.config import Settings, load_settings
from binderbox.errors import ConfigError, UsageError
from binderbox.naming import image_settings
from binderbox.providers import LocalSource

BASE = "binderbox/base:bookworm-20250101"
SETTINGS = Settings(ca_bundle="")


def config_error(repo) -> str:
    with pytest.raises(ConfigError) as info:
        detect(repo)
    return info.value.message


# --- when R is used ---------------------------------------------------------------------------


def test_no_r_files_means_no_r(make_repo):
    assert (
        detect(make_repo({"requirements.txt": "numpy\n", "runtime.txt": "python-3.11\n"})).r is None
    )


@pytest.mark.parametrize(
    ("line", "version", "snapshot"),
    [
        ("r-4.2-2023-01-01", "4.2", "2023-01-01"),
        ("r-4.2.2-2023-01-01", "4.2.2", "2023-01-01"),
        ("r-2023-06-15", "", "2023-06-15"),
        ("r-4.5", "4.5", ""),
    ],
)
def test_runtime_txt_r_forms(make_repo, line, version, snapshot):
    plan = detect(make_repo({"runtime.txt": f"# comment\n{line}\n"}))
    assert plan.r == RSetup(version=version, snapshot=snapshot)
    assert plan.python_version == ""


@pytest.mark.parametrize(
    "line", ["r-", "r-4", "r-latest", "r-4.2-20230101", "r-4.2-2023-13-01", "r-4.2_2023-01-01"]
)
def test_runtime_txt_malformed_r_is_config_error_naming_the_file(make_repo, line):
    message = config_error(make_repo({"binder/runtime.txt": line + "\n"}))
    assert message.startswith("binder/runtime.txt:")
    assert line in message


def test_runtime_txt_date_before_the_first_snapshot_warns(make_repo):
    plan = detect(make_repo({"binder/runtime.txt": "r-3.4-2016-05-01\n"}))
    assert plan.r.snapshot == "2016-05-01"
    assert len(plan.warnings) == 1
    assert plan.warnings[0].startswith("binder/runtime.txt asks for CRAN as of 2016-05-01")
    assert "2017-10-10" in plan.warnings[0]
    assert detect(make_repo({"runtime.txt": "r-2017-10-10\n"})).warnings == ()


def test_runtime_txt_r_is_read_from_the_binder_dir_only(make_repo):
    repo = make_repo({"binder/runtime.txt": "r-2023-01-01\n", "runtime.txt": "python-3.13\n"})
    plan = detect(repo)
    assert plan.r == RSetup(snapshot="2023-01-01")
    assert plan.python_version == ""


@pytest.mark.parametrize("where", ["", "binder/", ".binder/"])
def test_install_r_in_the_config_dir(make_repo, where):
    plan = detect(make_repo({f"{where}install.R": "library(stats)\n", "index.ipynb": "{}"}))
    assert plan.r == RSetup(install_script=f"{where}install.R")


def test_root_install_r_ignored_with_binder_dir(make_repo):
    assert (
        detect(make_repo({"install.R": "install.packages('x')\n", "binder/apt.txt": ""})).r is None
    )


def test_description_at_root_installs_the_package(make_repo):
    plan = detect(make_repo({"DESCRIPTION": "Package: demo\nVersion: 0.1\n", "R/f.R": ""}))
    assert plan.r == RSetup(package="demo")


@pytest.mark.parametrize(
    "files",
    [
        {"binder/DESCRIPTION": "Package: demo\n"},
        {".binder/DESCRIPTION": "Package: demo\n"},
        {"DESCRIPTION": "Package: demo\n", "binder/requirements.txt": "six\n"},
    ],
)
def test_description_only_at_root_without_binder_dir(make_repo, files):
    assert detect(make_repo(files)).r is None


@pytest.mark.parametrize("text", ["", "Title: no package\n", "Package: 1bad\n"])
def test_description_without_a_package_name_is_config_error(make_repo, text):
    assert config_error(make_repo({"DESCRIPTION": text})).startswith("DESCRIPTION:")


def test_r_goes_with_python_files_and_a_runtime_python(make_repo):
    repo = make_repo(
        {
            "runtime.txt": "python-3.13\n",
            "requirements.txt": "six\n",
            "install.R": "library(stats)\n",
            "apt.txt": "r-cran-jsonlite\n",
            "DESCRIPTION": "Package: both\n",
        }
    )
    plan = detect(repo)
    assert plan.python_version == "3.13"
    assert plan.requirements == Requirements("requirements.txt", local=False)
    assert plan.apt_packages == (AptPackage("r-cran-jsonlite"),)
    assert plan.r == RSetup(install_script="install.R", package="both")


def test_a_dockerfile_still_wins_over_r(make_repo):
    plan = detect(make_repo({"Dockerfile": "FROM x\n", "install.R": "", "runtime.txt": "r-4.2"}))
    assert (plan.dockerfile, plan.r) == ("Dockerfile", None)


# --- when compilers (r-base-dev) are needed ----------------------------------------------------


@pytest.mark.parametrize(
    ("script", "compiles"),
    [
        ("library(jsonlite)\n", False),
        ("# install.packages('x') is not needed\nrequire(stats)\n\noptions(warn = 1)\n", False),
        ("install.packages('ggplot2')\n", True),
        ("remotes::install_github('org/pkg')\n", True),
        ("renv::restore()\n", True),
        ('source("other.R")\n', True),
        ("library(jsonlite); install.packages('x')\n", True),
    ],
)
def test_install_r_compilers_unless_it_only_loads_packages(make_repo, script, compiles):
    assert detect(make_repo({"install.R": script})).r.compilers is compiles


DESCRIPTION = "Package: demo\nVersion: 0.1\n"


@pytest.mark.parametrize(
    ("extra", "apt", "compiles"),
    [
        ("", "", False),
        ("Depends: R (>= 4.0), methods,\n    utils\nImports: stats\n", "", False),
        ("Imports: jsonlite (>= 1.0)\n", "", True),
        ("Imports: jsonlite,\n  data.table\n", "r-cran-jsonlite\nr-cran-data.table\n", False),
        ("Imports: jsonlite,\n  data.table\n", "r-cran-jsonlite\n", True),
        ("LinkingTo: Rcpp\n", "", True),
    ],
)
def test_description_compilers_only_for_dependencies_not_in_apt_txt(
    make_repo, extra, apt, compiles
):
    files = {"DESCRIPTION": DESCRIPTION + extra}
    if apt:
        files["apt.txt"] = apt
    assert detect(make_repo(files)).r.compilers is compiles


def test_description_with_compiled_code_needs_compilers(make_repo):
    plan = detect(make_repo({"DESCRIPTION": DESCRIPTION, "src/f.c": "int f(void) { return 1; }"}))
    assert plan.r.compilers is True


def test_read_description_continuation_lines_and_versions():
    text = (
        "Package: demo\nTitle: A: title with colons\nImports:\n    jsonlite (>= 1.8),\n"
        "    R6,\n\tdigest\nDepends: R (>= 3.5.0), grid\nLinkingTo: R6\n"
    )
    assert r_support.read_description(text, "DESCRIPTION") == ("demo", ("jsonlite", "R6", "digest"))


# --- rendering ---------------------------------------------------------------------------------

R_PLAN = BuildPlan(
    apt_packages=(AptPackage("r-cran-jsonlite"),),
    requirements=Requirements("requirements.txt", local=False),
    r=RSetup(version="4.2", snapshot="2023-01-01", install_script="install.R", package="demo"),
    post_build="postBuild",
)


def dockerfile(plan=R_PLAN, **options) -> str:
    return render(plan, ImageOptions(base_image=BASE, **options)).dockerfile


def index(lines: list[str], needle: str) -> int:
    found = [i for i, line in enumerate(lines) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


def user_at(lines: list[str], position: int) -> str:
    return next(ln for ln in reversed(lines[:position]) if ln.startswith("USER ")).split()[1]


def test_r_layers_sit_between_the_server_stack_and_apt_txt():
    # A foreign base installs the server stack in the image, so its position shows.
    lines = dockerfile(foreign_base=True).splitlines()
    server = index(lines, "jupyterlab==")
    r_apt = index(lines, "r-base-core r-cran-irkernel")
    configure = index(lines, "Rprofile.site")
    kernel = index(lines, "IRkernel::installspec")
    apt_txt = index(lines, "install -y --no-install-recommends r-cran-jsonlite")
    # The wheels-only install with the shared cache (a from-source retry follows it).
    requirements = index(lines, "-r /tmp/binderbox-deps/requirements.txt --no-build")
    copy = index(lines, "COPY --chown=1000:1000 repo/ ")
    install_r = index(lines, "r-run.R install.R install.R")
    description = index(lines, "r-run.R DESCRIPTION")
    post_build = index(lines, "./postBuild")
    order = [server, r_apt, configure, kernel, apt_txt, requirements, copy, install_r]
    assert order == sorted(order)
    assert install_r < description < post_build
    assert user_at(lines, r_apt) == user_at(lines, configure) == "root"
    assert user_at(lines, kernel) == user_at(lines, install_r) == user_at(lines, description)
    assert user_at(lines, kernel) == "1000"


def test_the_r_apt_layer_is_the_same_for_every_r_repository():
    def r_apt_line(plan):
        lines = dockerfile(plan).splitlines()
        return lines[index(lines, "r-base-core")]

    other = BuildPlan(r=RSetup(snapshot="2019-05-01"))
    assert r_apt_line(R_PLAN) == r_apt_line(other)
    assert "r-base-dev" not in r_apt_line(R_PLAN)
    with_compilers = r_apt_line(BuildPlan(r=RSetup(install_script="install.R", compilers=True)))
    assert with_compilers.endswith(" r-base-core r-cran-irkernel r-base-dev")
    # The apt.txt step must stay distinguishable from this one in BuildKit's log.
    markers = [s.marker for s in render(R_PLAN, ImageOptions(base_image=BASE)).steps]
    assert len(markers) == len(set(markers))


def test_the_server_stack_layer_is_unchanged_by_r():
    def server(plan):
        lines = dockerfile(plan, foreign_base=True).splitlines()
        return lines[: index(lines, "jupyterlab==") + 1]

    assert server(R_PLAN) == server(BuildPlan())


def test_no_r_layers_without_r():
    text = dockerfile(BuildPlan(requirements=Requirements("requirements.txt", local=False)))
    assert "r-base-core" not in text
    assert "Rprofile" not in text
    assert "r-run.R" not in text


def rprofile_lines(text: str) -> list[str]:
    line = text.splitlines()[index(text.splitlines(), "Rprofile.site")]
    printf = line.removeprefix("RUN ").split(" >> ")[0]
    return shlex.split(printf)[2:]


@pytest.mark.parametrize(
    ("r", "configured", "mirror"),
    [
        (RSetup(snapshot="2023-01-01"), "", "https://packagemanager.posit.co/cran/2023-01-01"),
        (RSetup(version="4.2"), "", "https://cloud.r-project.org"),
        (RSetup(install_script="install.R"), "", "https://cloud.r-project.org"),
        (RSetup(snapshot="2015-01-01"), "", "https://packagemanager.posit.co/cran/2017-10-10"),
        (
            RSetup(snapshot="2023-01-01"),
            "http://cran.internal:8080/cran/",
            "http://cran.internal:8080/cran",
        ),
    ],
)
def test_cran_mirror_in_rprofile(r, configured, mirror):
    text = dockerfile(BuildPlan(r=r), cran_mirror=configured)
    assert rprofile_lines(text)[-1] == f'options(repos = c(CRAN = "{mirror}"))'
    assert "install -d -m 0755 -o 1000 -g 1000 /usr/local/lib/R/site-library" in text


def test_site_library_belongs_to_the_chosen_user():
    text = dockerfile(BuildPlan(r=RSetup()), user_id=1234, user_name="alice")
    assert "-o 1234 -g 1234 /usr/local/lib/R/site-library" in text


def test_kernelspec_goes_into_the_venv():
    text = dockerfile(BuildPlan(r=RSetup()))
    assert (
        'IRkernel::installspec(user = FALSE, prefix = "/srv/venv")'
        in shlex.split(
            text.splitlines()[index(text.splitlines(), "IRkernel")].removeprefix("RUN ")
        )[-1]
    )


def test_install_r_and_description_use_bind_mounted_helpers():
    recipe = render(R_PLAN, ImageOptions(base_image=BASE))
    lines = recipe.dockerfile.splitlines()
    install_r = lines[index(lines, "r-run.R install.R")]
    assert "--mount=type=bind,source=binderbox/r-run.R,target=/tmp/binderbox-r/r-run.R" in (
        install_r
    )
    assert recipe.support_files["r-run.R"] == r_support.RUNNER_SCRIPT
    assert recipe.support_files["r-install-description.R"] == r_support.DESCRIPTION_SCRIPT
    description = lines[index(lines, "r-run.R DESCRIPTION")]
    assert "source=binderbox/r-install-description.R" in description
    steps = {s.description for s in recipe.steps}
    assert "running install.R" in steps
    assert "installing the repository as the R package demo (DESCRIPTION)" in steps


def test_install_r_in_binder_dir_runs_from_the_repository_root():
    plan = BuildPlan(config_dir="binder", r=RSetup(install_script="binder/install.R"))
    lines = dockerfile(plan).splitlines()
    run = lines[index(lines, "r-run.R")]
    assert run.endswith("Rscript /tmp/binderbox-r/r-run.R binder/install.R binder/install.R")
    assert lines[index(lines, "WORKDIR ")] == "WORKDIR /home/jovyan"


def test_runtime_only_r_has_no_install_steps():
    recipe = render(BuildPlan(r=RSetup(version="4.2")), ImageOptions(base_image=BASE))
    assert "r-run.R" not in recipe.dockerfile
    assert "r-run.R" not in recipe.support_files


# --- the CRAN mirror setting -------------------------------------------------------------------

BAD_MIRRORS = [
    "ftp://cran.example.org",
    "cran.example.org",
    "https://cran.example.org/a b",
    "https://cran.example.org/'; touch /x; '",
    'https://cran.example.org/"',
    "https://cran.example.org/\\",
    "https://cran.example.org/`id`",
    "https://cran.example.org/\n",
    "https://",
]


@pytest.mark.parametrize("url", BAD_MIRRORS)
def test_bad_mirror_is_refused_by_the_settings_and_the_renderer(url):
    with pytest.raises(UsageError, match="cran_mirror"):
        SETTINGS.with_overrides(cran_mirror=url)
    with pytest.raises(UsageError, match="cran_mirror"):
        dockerfile(BuildPlan(r=RSetup()), cran_mirror=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://cloud.r-project.org",
        "http://10.0.0.5:3939/cran/__linux__/bookworm/2024-01-02/",
        "https://packagemanager.posit.co/cran/2023-01-01",
    ],
)
def test_good_mirrors_are_accepted(url):
    assert SETTINGS.with_overrides(cran_mirror=url).cran_mirror == url


def test_mirror_and_r_fallback_from_environment_and_toml(tmp_path):
    settings = load_settings(
        environ={"BINDERBOX_CRAN_MIRROR": "https://cran.example.org", "BINDERBOX_CA_BUNDLE": ""}
    )
    assert settings.cran_mirror == "https://cran.example.org"
    assert settings.r_version_fallback == "nearest"
    path = tmp_path / "b.toml"
    path.write_text('r_version_fallback = "fail"\nca_bundle = ""\n')
    assert load_settings(path, environ={}).r_version_fallback == "fail"
    path.write_text('r_version_fallback = "latest"\nca_bundle = ""\n')
    with pytest.raises(UsageError, match="r_version_fallback"):
        load_settings(path, environ={})


def test_a_mirror_setting_changes_the_image_name(tmp_path):
    request = BuildRequest(source=LocalSource(tmp_path))
    assert request.non_default_options() == {}
    mirrored = SETTINGS.with_overrides(cran_mirror="https://cran.example.org")
    assert image_settings(mirrored) == {"cran_mirror": "https://cran.example.org"}
    assert request.image_for(mirrored, "c0ffee") != request.image_for(SETTINGS, "c0ffee")


# --- which R: one per Debian suite -------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "suite"),
    [
        ("", "bookworm"),
        ("4.2", "bookworm"),
        ("4.2.2", "bookworm"),
        ("4", "bookworm"),
        ("4.5", "trixie"),
    ],
)
def test_r_version_shipped_by_a_suite_picks_it_without_warning(version, suite):
    assert choose_r_suite(version, SETTINGS) == (suite, "")


def test_configured_suite_is_preferred_when_it_has_the_r():
    assert choose_r_suite("", Settings(ca_bundle="", base_suite="trixie")) == ("trixie", "")
    assert choose_r_suite("4", Settings(ca_bundle="", base_suite="trixie")) == ("trixie", "")


@pytest.mark.parametrize(
    ("version", "suite", "shipped"),
    [
        ("4.1", "bookworm", "4.2.2"),
        ("3.6", "bookworm", "4.2.2"),
        ("4.2.3", "bookworm", "4.2.2"),
        ("4.4", "trixie", "4.5.0"),
        ("5.0", "trixie", "4.5.0"),
    ],
)
def test_unavailable_r_uses_the_nearest_with_a_warning(version, suite, shipped):
    chosen, warning = choose_r_suite(version, SETTINGS)
    assert chosen == suite
    assert f"R {version}" in warning
    assert f"R {shipped}" in warning


def test_unavailable_r_can_be_refused():
    with pytest.raises(ConfigError, match=r"R 4\.1.*R 4\.2\.2 \(bookworm\)"):
        choose_r_suite("4.1", Settings(ca_bundle="", r_version_fallback="fail"))
    ok = Settings(ca_bundle="", r_version_fallback="fail")
    assert choose_r_suite("4.5", ok) == ("trixie", "")


def test_a_requested_python_decides_the_suite_and_r_follows():
    suite, warning = choose_r_suite("4.5", SETTINGS, python_suite="bookworm")
    assert suite == "bookworm"
    assert "R 4.5" in warning and "R 4.2.2" in warning
    assert choose_r_suite("4.2", SETTINGS, python_suite="bookworm") == ("bookworm", "")
