"""The base image: Debian from its own packages (mmdebstrap + docker import), plus uv.

No registry is needed. The image is named ``binderbox/base:<suite>-<date>`` and carries a
label with a hash of its recipe, so a change of recipe builds a new base while an
unchanged one is reused.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from binderbox.builder import package_index, stack
from binderbox.builder.engine import DockerEngine
from binderbox.builder.render import server_stack_command, uv_install_command
from binderbox.errors import BuildFailed, UsageError

BASE_REPOSITORY = "binderbox/base"
RECIPE_LABEL = "binderbox.base-recipe"

# Suites binderbox can bootstrap, and the Python each ships.
SUITE_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
# The R each suite ships as r-base-core (Debian has one R version per suite).
SUITE_R = {"bookworm": "4.2.2", "trixie": "4.5.0"}

BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "git",
    "locales",
    "ca-certificates",
    "tini",
    "nodejs",
    "npm",
)

_IMPORT_CHANGES = [
    "ENV LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8 "
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["/bin/bash"]',
]


def _finishing_dockerfile(rootfs_tag: str, index_url: str = "") -> str:
    """uv, the default user and the Jupyter server stack on top of the Debian root fs.

    The stack lives in the base so that every repository's build starts from it: it is
    the biggest part of any image and identical for all of them. ``index_url`` is where
    uv and the stack come from; as build arguments it stays out of the base's own
    environment (images set their own) and out of its recipe (the content is the same).
    """
    # The CA bundle is bind-mounted for pip and uv and never copied into the base.
    ca = "/tmp/binderbox-ca.crt"
    ca_mount = f"--mount=type=bind,source=ca.crt,target={ca}"
    uid, name = stack.BASE_USER_ID, stack.BASE_USER_NAME
    uv_cache = (
        f"--mount=type=cache,id=binderbox-uv-{uid},target={stack.UV_CACHE},uid={uid},gid={uid}"
    )
    index = package_index.environment(index_url)
    arguments = "".join(f"ARG {pair}\n" for pair in index.split())
    return (
        f"FROM {rootfs_tag}\n"
        f"{arguments}"
        f"RUN {ca_mount} {uv_install_command(ca)}"
        f" && ln -s {stack.UV_HOME}/bin/uv /usr/local/bin/uv\n"
        f"RUN groupadd --gid {uid} {name}"
        f" && useradd --uid {uid} --gid {uid} --create-home --shell /bin/bash {name}"
        f" && install -d -o {uid} -g {uid} {stack.VENV}\n"
        f"USER {uid}\n"
        f"ENV SSL_CERT_FILE={ca} UV_CACHE_DIR={stack.UV_CACHE} UV_LINK_MODE=copy"
        " UV_COMPILE_BYTECODE=1 UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1\n"
        f"RUN {ca_mount} {uv_cache} {server_stack_command()}\n"
        "USER root\n"
    )


def recipe_hash(suite: str) -> str:
    """A short hash of everything that decides the content of the base image."""
    text = "\n".join([suite, *BASE_PACKAGES, *_IMPORT_CHANGES, _finishing_dockerfile("ROOTFS")])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_suite(suite: str) -> None:
    if suite not in SUITE_PYTHON:
        known = ", ".join(SUITE_PYTHON)
        raise UsageError(f"Unknown base suite '{suite}'; binderbox can build: {known}.")


def find_base(engine: DockerEngine, suite: str) -> str:
    """The newest local base image for ``suite`` built from the current recipe, or ''."""
    check_suite(suite)
    wanted = recipe_hash(suite)
    candidates = sorted(
        (t for t in engine.tags_of(BASE_REPOSITORY) if t.split(":", 1)[1].startswith(suite + "-")),
        reverse=True,
    )
    for tag in candidates:
        if (engine.image_labels(tag) or {}).get(RECIPE_LABEL) == wanted:
            return tag
    return ""


def build_base(
    engine: DockerEngine,
    suite: str,
    *,
    mirror: str = "",
    ca_bundle: str = "",
    index_url: str = "",
    on_line: Callable[[str], None] = lambda line: None,
) -> str:
    """Bootstrap ``binderbox/base:<suite>-<date>`` and return its name."""
    check_suite(suite)
    if not shutil.which("mmdebstrap"):
        raise UsageError(
            "mmdebstrap is not installed; run the setup command from the README "
            "(or apt-get install mmdebstrap)."
        )
    date = datetime.date.today().strftime("%Y%m%d")
    tag = f"{BASE_REPOSITORY}:{suite}-{date}"
    rootfs_tag = f"binderbox/base-rootfs:{suite}-{date}"
    with tempfile.TemporaryDirectory(prefix="binderbox-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        command = [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES),
            "--customize-hook=echo 'en_US.UTF-8 UTF-8' > \"$1/etc/locale.gen\"",
            '--customize-hook=chroot "$1" locale-gen',
            suite,
            str(tarball),
        ]
        if mirror:
            command.append(mirror)
        on_line("$ " + " ".join(command[:3]) + " … " + suite)
        _run_streaming(command, on_line, "Bootstrapping the Debian base with mmdebstrap failed")
        engine.import_tarball(tarball, rootfs_tag, _IMPORT_CHANGES)
        tarball.unlink()

        context = Path(tmp) / "context"
        context.mkdir()
        bundle = Path(ca_bundle) if ca_bundle else Path("/etc/ssl/certs/ca-certificates.crt")
        shutil.copyfile(bundle, context / "ca.crt")
        (context / "Dockerfile").write_text(_finishing_dockerfile(rootfs_tag, index_url))
        try:
            engine.build(
                context,
                context / "Dockerfile",
                tag,
                labels={RECIPE_LABEL: recipe_hash(suite), "binderbox.python": SUITE_PYTHON[suite]},
                on_line=on_line,
            )
        finally:
            engine.remove_image(rootfs_tag)
    return tag


def _run_streaming(command: list[str], on_line: Callable[[str], None], failure: str) -> None:
    tail: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            tail = [*tail[-24:], line]
            on_line(line)
    if process.returncode != 0:
        raise BuildFailed(f"{failure} (exit code {process.returncode}).", log_tail="\n".join(tail))
