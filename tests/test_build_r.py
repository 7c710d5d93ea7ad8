"""R repositories built for real: R from Debian, the IRkernel answering in Jupyter,
DESCRIPTION packages, and install.R failures. CRAN is not reachable here, so nothing
below installs from it."""

from __future__ import annotations

import pytest
from tests.conftest import run_in_image

pytestmark = pytest.mark.docker

# Starts the 'ir' kernel the way Jupyter does and prints what the code writes to stdout.
RUN_IN_R_KERNEL = """
import sys
from jupyter_client.manager import start_new_kernel

km, kc = start_new_kernel(kernel_name="ir", startup_timeout=90)
out = []
try:
    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(sys.argv[1], output_hook=hook, timeout=90)
    assert reply["content"]["status"] == "ok", reply["content"]
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print("".join(out))
"""


def sh(image: str, script: str) -> str:
    result = run_in_image(image, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_r_runtime_apt_and_install_r_give_a_working_r_kernel(make_repo, build):
    repo = make_repo(
        {
            "runtime.txt": "r-4.2-2023-01-01\n",
            "apt.txt": "r-cran-jsonlite\n",
            # Only loads packages, so no compilers are needed.
            "install.R": 'library(jsonlite)\ncat(toJSON(list(ok = TRUE)), file = "~/r-ran")\n',
            "postBuild": "#!/bin/sh\ncp ~/r-ran ~/post-build-saw-it\n",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    warnings = [e["message"] for e in result.events if e["message"].startswith("Warning:")]
    assert not warnings  # Debian bookworm ships R 4.2
    image = result.image

    kernels = sh(image, "jupyter kernelspec list")
    assert "/srv/venv/share/jupyter/kernels/ir" in kernels, kernels
    assert "python3" in kernels
    kernel = run_in_image(image, "python", "-c", RUN_IN_R_KERNEL, "cat(6*7)", timeout=180)
    assert kernel.returncode == 0, kernel.stderr
    assert kernel.stdout.strip() == "42"

    # install.R ran as the user before postBuild; no compilers were installed for it.
    assert sh(image, "cat ~/post-build-saw-it; echo; stat -c %U ~/r-ran") == (
        '{"ok":[true]}\njovyan'
    )
    assert run_in_image(image, "dpkg", "-s", "r-base-dev").returncode != 0
    r_info = (
        'cat(R.version$major, R.version$minor, getOption("repos")[["CRAN"]],'
        " .libPaths()[1], file.access(.libPaths()[1], 2) == 0, sep = '\\n')"
    )
    assert run_in_image(image, "Rscript", "-e", r_info).stdout.split() == [
        "4",
        "2.2",
        "https://packagemanager.posit.co/cran/2023-01-01",
        "/usr/local/lib/R/site-library",
        "TRUE",
    ]


def test_description_installs_the_repository_as_an_r_package(make_repo, build):
    description = (
        "Package: hello42\nTitle: Says the Answer\nVersion: 0.1.0\n"
        "Description: A package for a test.\nLicense: MIT\n"
        'Authors@R: person("Test", "Author", email = "t@example.org", role = c("aut", "cre"))\n'
    )
    repo = make_repo(
        {
            # No NAMESPACE: R CMD build writes one that exports everything.
            "DESCRIPTION": description,
            "R/answer.R": 'f <- function() cat("answer", 6 * 7, "\\n")\n',
            "analysis.ipynb": "{}",
        }
    )
    result = build(str(repo))
    assert result.code == 0, result.stderr
    probe = run_in_image(result.image, "sh", "-c", "cd /tmp && Rscript -e 'library(hello42); f()'")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "answer 42"
    assert sh(result.image, "stat -c %U /usr/local/lib/R/site-library/hello42") == "jovyan"
    # The package was built outside the repository, which is left as it was.
    assert set(sh(result.image, "ls ~").split()) == {"DESCRIPTION", "R", "analysis.ipynb"}


def test_install_r_that_cannot_install_fails_the_build_naming_install_r(make_repo, build):
    repo = make_repo(
        {
            "binder/runtime.txt": "r-2023-01-01\n",
            "binder/install.R": 'install.packages("notarealpackage")\n',
        }
    )
    result = build(str(repo))
    assert result.code == 1
    message = result.failure["message"]
    assert "binder/install.R" in message
    assert "notarealpackage" in message
    assert "is not available" in message
    assert "could not reach https://packagemanager.posit.co/cran/2023-01-01" in message
    assert not result.image
