"""Turn a BuildPlan into a Dockerfile and the files its build context needs (pure).

Layers are ordered cache-first: what is identical for every repository on one base
(user, CA bundle, the Jupyter server stack) comes first, then apt packages and
dependency files, and the rest of the repository is copied last, so editing a notebook
rebuilds only the final thin layers.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from binderbox.builder import lock, package_index, r_support, stack
from binderbox.builder.cache import cache_key
from binderbox.builder.plan import BuildPlan
from binderbox.errors import UsageError

# Folders inside the build context.
REPO_IN_CONTEXT = "repo"
SUPPORT_IN_CONTEXT = "binderbox"

ENTRYPOINT_SCRIPT = """#!/bin/sh
# Runs the container command through the repository's `start` script, when it has one.
if [ -n "${BINDERBOX_START:-}" ] && [ -x "$BINDERBOX_START" ]; then
    exec "$BINDERBOX_START" "$@"
fi
exec "$@"
"""

# Requirement lines binderbox derived from a Pipfile or environment.yml, in the context.
DERIVED_REQUIREMENTS = "derived-requirements.txt"
# A rebuild's locked Python packages, in the context.
LOCKED_REQUIREMENTS = "locked-requirements.txt"

DEFAULT_COMMAND = ("jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser")

_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_REPO_DIR = re.compile(r"^/[A-Za-z0-9._/-]*$")


@dataclass(frozen=True)
class ImageOptions:
    """Choices that shape the image beyond the repository's own files."""

    base_image: str
    # True when the base was not built by `binderbox base` and needs Python, uv and tini.
    foreign_base: bool = False
    user_id: int = 1000
    user_name: str = "jovyan"
    # Where the repository goes; "" means the user's home.
    target_repo_dir: str = ""
    appendix: str = ""
    with_ca_bundle: bool = False
    # CRAN mirror for R images; "" means runtime.txt's snapshot date, else plain CRAN.
    cran_mirror: str = ""
    # Compile the repository's Python packages to bytecode at build time.
    compile_bytecode: bool = False
    # This deployment's cache secret (builder/cache.py) and the repository's slug: the ids
    # of the shared caches and of this repository's private one derive from them.
    cache_secret: str = ""
    repository_slug: str = ""
    # The package index pip and uv install from; "" or any address of PyPI means PyPI.
    index_url: str = ""
    # The last step records what the image holds for the build's lock (builder/lock.py).
    record_environment: bool = True
    # A rebuild from a lock: these ``name==version`` lines are installed with --no-deps
    # before the repository's own requirements (which then find them installed), and
    # apt may go back to the locked versions of packages an earlier step installed.
    locked_python: tuple[str, ...] = ()
    locked_apt: bool = False

    def cache_keys(self) -> tuple[str, str]:
        """(shared key, this repository's key) for cache ids; ("", "") without a secret."""
        if not self.cache_secret:
            return "", ""
        return (
            cache_key(self.cache_secret, "shared"),
            cache_key(self.cache_secret, "repository", self.repository_slug),
        )

    @property
    def home(self) -> str:
        return f"/home/{self.user_name}"

    @property
    def user_uv_cache(self) -> str:
        """uv's cache outside the build's cache mounts: the user's own, as uv's default."""
        return f"{self.home}/.cache/uv"

    @property
    def repo_dir(self) -> str:
        return self.target_repo_dir or self.home

    def validate(self) -> None:
        """Raise UsageError when an option could not safely go into the Dockerfile."""
        if not 1 <= self.user_id <= 65534:
            raise UsageError("--user-id must be between 1 and 65534 (never 0, root).")
        if not _USER_NAME.fullmatch(self.user_name) or self.user_name == "root":
            raise UsageError(
                f"--user-name {self.user_name!r} is not a valid user name "
                "(lowercase letters, digits, '_' and '-', not 'root')."
            )
        repo_dir = self.target_repo_dir
        if repo_dir and (
            not _REPO_DIR.fullmatch(repo_dir)
            or posixpath.normpath(repo_dir) != repo_dir.rstrip("/")
            or posixpath.normpath(repo_dir) == "/"
        ):
            raise UsageError(
                f"--target-repo-dir {repo_dir!r} must be an absolute path such as /srv/repo."
            )
        if self.cran_mirror and not r_support.check_mirror(self.cran_mirror):
            raise UsageError(
                f"cran_mirror {self.cran_mirror!r} must be an http(s) URL without quotes, "
                "backslashes or spaces."
            )
        index_problem = package_index.check_index_url(self.index_url) if self.index_url else ""
        if index_problem:
            raise UsageError(index_problem)


@dataclass(frozen=True)
class Step:
    """One RUN instruction, described for the user; ``marker`` finds it in BuildKit's log."""

    description: str
    marker: str


@dataclass(frozen=True)
class Recipe:
    """A rendered Dockerfile plus the support files to place beside the repository."""

    dockerfile: str
    support_files: dict[str, str] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()
    # Words of the Dockerfile that must not reach build logs (the cache ids' keys).
    hidden: tuple[str, ...] = ()


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps: list[Step] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def run(self, description: str, command: str, mounts: tuple[str, ...] = ()) -> None:
        mount_flags = "".join(f"--mount={m} " for m in mounts)
        self.lines.append(f"RUN {mount_flags}{command}")
        self.steps.append(Step(description, command[:60]))


def render(plan: BuildPlan, options: ImageOptions) -> Recipe:
    """Render the Dockerfile for a plan that has no Dockerfile of its own."""
    if plan.dockerfile:
        raise ValueError("a plan with its own Dockerfile is built as written, not rendered")
    options.validate()
    uid = options.user_id
    owner = f"{uid}:{uid}"
    home, repo_dir = options.home, options.repo_dir
    shared_key, private_key = options.cache_keys()
    shared = f"-{shared_key}" if shared_key else ""
    # The cache every repository's wheels-only installs share; no repository code ever
    # runs while it is mounted (see _install).
    uv_cache = (
        f"type=cache,id=binderbox-uv-{uid}{shared},target={stack.UV_CACHE},uid={uid},gid={uid}",
    )
    # This repository's own cache, for installing the repository as a package.
    private_cache = (
        f"type=cache,id=binderbox-uv-{uid}-{private_key or 'repository'},"
        f"target={stack.UV_CACHE},uid={uid},gid={uid}",
    )
    apt_mounts = tuple(_keyed(m, shared) for m in r_support.APT_CACHE_MOUNTS)
    w = _Writer()

    w.add(f"FROM {options.base_image}")
    w.add("USER root")
    w.add(
        "ENV DEBIAN_FRONTEND=noninteractive LANG=en_US.UTF-8 LANGUAGE=en_US:en "
        "LC_ALL=en_US.UTF-8 SHELL=/bin/bash"
    )
    index_environment = package_index.environment(options.index_url)
    if index_environment:
        # Before anything is installed: uv itself (on other bases), the server stack and
        # the repository's packages all come from the operator's index.
        w.add(f"ENV {index_environment}")
    if options.foreign_base:
        w.run("preparing the base image", system_bootstrap_command())
    support = {"entrypoint": ENTRYPOINT_SCRIPT}
    if options.with_ca_bundle:
        w.add(
            f"COPY {SUPPORT_IN_CONTEXT}/extra-ca.crt "
            "/usr/local/share/ca-certificates/binderbox-extra.crt"
        )
        # Appended rather than regenerated: cheaper, and later apt triggers keep it.
        w.run(
            "trusting the extra CA bundle",
            "cat /usr/local/share/ca-certificates/binderbox-extra.crt"
            " >> /etc/ssl/certs/ca-certificates.crt",
        )
    if options.foreign_base:
        w.run("installing uv", uv_install_command("/etc/ssl/certs/ca-certificates.crt"))
    w.add(f"COPY {SUPPORT_IN_CONTEXT}/entrypoint /usr/local/bin/binderbox-entrypoint")
    w.run(f"creating the user {options.user_name}", _user_command(options))
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    w.add(
        f"ENV NB_USER={options.user_name} NB_UID={uid} USER={options.user_name} HOME={home} "
        f"REPO_DIR={repo_dir} NB_PYTHON_PREFIX={stack.VENV} KERNEL_PYTHON_PREFIX={stack.VENV} "
        f"VIRTUAL_ENV={stack.VENV} "
        f"PATH={home}/.local/bin:{repo_dir}/.local/bin:{stack.VENV}/bin:{stack.UV_HOME}/bin:"
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
        f"SSL_CERT_FILE={bundle} PIP_CERT={bundle} REQUESTS_CA_BUNDLE={bundle} "
        f"NODE_EXTRA_CA_CERTS={bundle} "
        # The cache mounts' target, for the install steps; the user's own after them.
        f"UV_CACHE_DIR={stack.UV_CACHE} UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never "
        # The server stack in the base is always compiled (it decides how fast sessions
        # start); the repository's packages only on request: see compile_bytecode.
        f"UV_COMPILE_BYTECODE={1 if options.compile_bytecode else 0} "
        "UV_NO_PROGRESS=1 PYTHONUNBUFFERED=1"
    )

    # The Jupyter server stack is part of binderbox's base images; on any other base it is
    # installed here, with the same text for every repository, so it is built once.
    w.add(f"USER {uid}")
    if options.foreign_base:
        w.run("installing the Jupyter server stack", server_stack_command(), mounts=uv_cache)

    if plan.r:
        # R and its kernel: after the server stack, so that layer stays shared by all, and
        # before apt.txt, which may add r-cran-* packages. The apt layer is the same for
        # every R repository (with or without compilers); the mirror comes after it.
        w.add("USER root")
        w.run(
            "installing R from Debian packages",
            r_support.install_command(plan.r),
            mounts=apt_mounts,
        )
        w.run(
            "configuring R (CRAN mirror, library)",
            r_support.configure_command(r_support.cran_mirror(plan.r, options.cran_mirror), uid),
        )
        w.add(f"USER {uid}")
        w.run("registering the R kernel", r_support.kernelspec_command())

    if plan.apt_packages:
        names = " ".join(shlex.quote(p.spec()) for p in plan.apt_packages)
        downgrades = "--allow-downgrades " if options.locked_apt else ""
        w.add("USER root")
        w.run(
            "installing the locked Debian packages"
            if options.locked_apt
            else "installing Debian packages (apt.txt)",
            f"apt-get update -qq && apt-get install -y --no-install-recommends {downgrades}"
            + names,
            mounts=apt_mounts,
        )
        w.add(f"USER {uid}")

    if options.locked_python:
        support[LOCKED_REQUIREMENTS] = "".join(f"{line}\n" for line in options.locked_python)
        locked = "/tmp/binderbox-deps/locked.txt"
        w.add(f"COPY --chown={owner} {SUPPORT_IN_CONTEXT}/{LOCKED_REQUIREMENTS} {locked}")
        _install(w, "installing the locked Python packages", "", f"--no-deps -r {locked}", uv_cache)

    reqs = plan.requirements
    deps = "/tmp/binderbox-deps/requirements.txt"
    if reqs and reqs.derived:
        # Derived from a Pipfile or environment.yml: a support file, not a repository file.
        support[DERIVED_REQUIREMENTS] = reqs.derived
        requirements_source = f"{SUPPORT_IN_CONTEXT}/{DERIVED_REQUIREMENTS}"
    elif reqs:
        requirements_source = f"{REPO_IN_CONTEXT}/{reqs.path}"
    if reqs and not reqs.local:
        # Only the requirements file first: editing anything else keeps this layer.
        w.add(f"COPY --chown={owner} {requirements_source} {deps}")
        _install(w, f"installing {reqs.path}", "", f"-r {deps}", uv_cache)

    w.add(f"COPY --chown={owner} {REPO_IN_CONTEXT}/ {repo_dir}/")
    w.add(f"WORKDIR {repo_dir}")
    if reqs and reqs.local and reqs.from_its_folder:
        # As conda installs a pip section: from a file beside environment.yml, in its folder,
        # so "-e ." and "-r other.txt" there mean what they mean to conda.
        folder = posixpath.dirname(reqs.path) or "."
        beside = ".binderbox-pip-requirements.txt"
        target = posixpath.join(repo_dir, folder, beside)
        w.add(f"COPY --chown={owner} {requirements_source} {posixpath.normpath(target)}")
        _install(
            w,
            f"installing {reqs.path}",
            f"cd {shlex.quote(folder)} && ",
            f"-r {beside}",
            uv_cache,
            then=f" && rm {beside}",
        )
    elif reqs and reqs.local:
        # Relative paths in it are relative to the repository, as pip reads them from there.
        if reqs.derived:
            w.add(f"COPY --chown={owner} {requirements_source} {deps}")
        _install(
            w,
            f"installing {reqs.path}",
            "",
            f"-r {deps if reqs.derived else shlex.quote(reqs.path)}",
            uv_cache,
        )
    if plan.install_project:
        # The repository's own code builds here: never with the shared cache.
        w.run(
            f"installing the repository as a package ({plan.install_project})",
            f"uv pip install --python {stack.VENV}/bin/python .",
            mounts=private_cache,
        )
    # No later step mounts the build's uv cache, and everything from here on (install.R,
    # postBuild, the appendix, every session) runs as the user, whose uv must write its
    # cache: the mount's target is an empty folder of root's in the image.
    w.add(f"ENV UV_CACHE_DIR={options.user_uv_cache}")
    if plan.r and (plan.r.install_script or plan.r.package):
        # After the copy, as install.R may use the repository's files; before postBuild.
        support[r_support.RUNNER] = r_support.RUNNER_SCRIPT
        runner = r_support.helper_mount(r_support.RUNNER, SUPPORT_IN_CONTEXT)
        if plan.r.install_script:
            w.run(
                f"running {plan.r.install_script}",
                r_support.run_script_command(plan.r.install_script, plan.r.install_script),
                mounts=(runner,),
            )
        if plan.r.package:
            support[r_support.DESCRIPTION_INSTALLER] = r_support.DESCRIPTION_SCRIPT
            installer = f"{r_support.HELPERS_IN_IMAGE}/{r_support.DESCRIPTION_INSTALLER}"
            w.run(
                f"installing the repository as the R package {plan.r.package} (DESCRIPTION)",
                r_support.run_script_command("DESCRIPTION", installer),
                mounts=(
                    runner,
                    r_support.helper_mount(r_support.DESCRIPTION_INSTALLER, SUPPORT_IN_CONTEXT),
                ),
            )
    executables = [p for p in (plan.start, plan.post_build) if p]
    if executables:
        quoted = " ".join(shlex.quote(p) for p in executables)
        command = f"chmod +x {quoted}"
        if plan.post_build:
            command += f" && ./{shlex.quote(plan.post_build)}"
        w.run(f"running {plan.post_build}" if plan.post_build else "preparing start", command)

    if options.appendix.strip():
        w.add("# --appendix")
        w.add(options.appendix.strip())
        w.add(f"USER {uid}")
        w.add(f"WORKDIR {repo_dir}")

    if options.record_environment:
        # Last, so it sees everything the build installed; it writes the image's
        # environment file and never fails the build (builder/lock.py).
        support[lock.COLLECTOR] = lock.COLLECTOR_SCRIPT
        collector = f"/tmp/binderbox-lock/{lock.COLLECTOR}"
        base_status = "/tmp/binderbox-lock/base-dpkg-status"
        w.add("USER root")
        w.run(
            "recording the environment for the build's lock",
            f"/usr/bin/python3 {collector} {base_status}",
            mounts=(
                f"type=bind,source={SUPPORT_IN_CONTEXT}/{lock.COLLECTOR},target={collector}",
                f"type=bind,from={options.base_image},source=/var/lib/dpkg/status,"
                f"target={base_status}",
            ),
        )
        w.add(f"USER {uid}")

    if plan.start:
        w.add(f"ENV BINDERBOX_START={repo_dir}/{plan.start}")
    w.add("EXPOSE 8888")
    w.add('ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/binderbox-entrypoint"]')
    w.add(f"CMD {json.dumps(list(DEFAULT_COMMAND))}")
    hidden = tuple(k for k in (shared_key, private_key) if k)
    return Recipe("\n".join(w.lines) + "\n", support, tuple(w.steps), hidden)


# Left in the layer by a wheels-only install that could not finish; the next step sees it.
NEEDS_BUILD_MARKER = "/tmp/binderbox-needs-build"


def _install(
    w: _Writer,
    description: str,
    prefix: str,
    requirements: str,
    shared: tuple[str, ...],
    then: str = "",
) -> None:
    """Install requirements in two steps, so no repository code runs beside the shared cache.

    First wheels only (``--no-build``: uv runs no setup.py or build backend) with the cache
    every repository shares; when something must be built from source, that step leaves a
    marker and the second installs everything with a cache of its own that it deletes: no
    other build ever sees it. Without the marker the second step does nothing, and as it
    mounts nothing, its layer is shared by every repository with the same requirements.
    """
    install = f"uv pip install --python {stack.VENV}/bin/python {requirements}"
    w.run(
        description + ", wheels only",
        f"{prefix}{{ {install} --no-build{then} || {{ touch {NEEDS_BUILD_MARKER};"
        ' echo "binderbox: some requirements must be built from source, which happens'
        " with this repository's own cache\"; }; }",
        mounts=shared,
    )
    own = "/tmp/binderbox-uv-build"
    w.run(
        description,
        f"if [ -e {NEEDS_BUILD_MARKER} ]; then rm {NEEDS_BUILD_MARKER} && {prefix}"
        f"{{ UV_CACHE_DIR={own} {install}{then}; code=$?; rm -rf {own}; exit $code; }}; fi",
    )


def _keyed(mount: str, key: str) -> str:
    """A cache mount with ``key`` appended to its id."""
    return re.sub(r"\bid=([^,]+)", lambda m: f"id={m[1]}{key}", mount, count=1)


def _user_command(options: ImageOptions) -> str:
    """Create the image's user (binderbox bases already have jovyan, 1000) and its folders."""
    uid, name = options.user_id, options.user_name
    command = "chmod 0755 /usr/local/bin/binderbox-entrypoint"
    has_user = not options.foreign_base and (uid, name) == (
        stack.BASE_USER_ID,
        stack.BASE_USER_NAME,
    )
    if not has_user:
        # Another base may already have this user (Jupyter's images have jovyan): adjust it.
        command += (
            f" && if getent group {name} >/dev/null;"
            f" then groupmod --non-unique --gid {uid} {name};"
            f" else groupadd --non-unique --gid {uid} {name}; fi"
            f" && if id -u {name} >/dev/null 2>&1;"
            f" then usermod --non-unique --uid {uid} --gid {uid} --home {options.home} {name};"
            f" else useradd --non-unique --uid {uid} --gid {uid} --create-home"
            f" --shell /bin/bash {name}; fi"
        )
    dirs = [options.home, options.repo_dir]
    if options.foreign_base:
        dirs.insert(0, stack.VENV)
    command += f" && install -d -o {uid} -g {uid} " + " ".join(
        shlex.quote(d) for d in dict.fromkeys(dirs)
    )
    if not options.foreign_base and uid != stack.BASE_USER_ID:
        # The base's server stack belongs to uid 1000; the user must own their Python.
        command += f" && chown -R {uid}:{uid} {stack.VENV}"
    return command


def server_stack_command() -> str:
    """Create the venv and install the pinned Jupyter server stack into it."""
    return (
        f"uv venv --allow-existing --seed --python /usr/bin/python3 {stack.VENV}"
        f" && uv pip install --python {stack.VENV}/bin/python "
        + " ".join(stack.SERVER_STACK)
        # jsonschema builds ~35 parsers when this optional format checker is importable,
        # about half a second of every session's start; Jupyter works without it.
        + f" && uv pip uninstall --python {stack.VENV}/bin/python rfc3987-syntax"
        # No "get Jupyter news?" question in every throwaway session, and no session
        # reaching out to jupyter.org for news and updates.
        + f" && {stack.VENV}/bin/jupyter labextension disable --level=sys_prefix"
        " @jupyterlab/apputils-extension:announcements >/dev/null"
    )


def system_bootstrap_command() -> str:
    """Shell command that gives any Debian or Ubuntu image what binderbox images need."""
    packages = "python3 python3-venv git locales ca-certificates tini"
    return (
        "apt-get update -qq"
        f" && apt-get install -y --no-install-recommends {packages}"
        " && rm -rf /var/lib/apt/lists/*"
        ' && echo "en_US.UTF-8 UTF-8" > /etc/locale.gen && locale-gen >/dev/null'
    )


def uv_install_command(ca_file: str) -> str:
    """Shell command that installs uv from PyPI into its own venv."""
    return (
        f"python3 -m venv {stack.UV_HOME}"
        f" && PIP_CERT={shlex.quote(ca_file)} {stack.UV_HOME}/bin/pip install --no-cache-dir"
        f" --disable-pip-version-check -q uv=={stack.UV_VERSION}"
    )
