"""Launches through the real service under operator settings that change the image: the
image the service looks for is the image the builder made (naming.image_name_for)."""

from __future__ import annotations

from urllib.parse import quote

import docker
import pytest
from tests.test_serve import run_code, serving
from tests.test_service_build import build_path, building_service, phases, served_repo

pytestmark = pytest.mark.docker


def image_present(name: str) -> bool:
    try:
        docker.from_env().images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def test_a_launch_under_compile_bytecode_runs(tmp_path_factory, base_image, git_server, tmp_path):
    files = {"requirements.txt": "six==1.16.0\n", "index.ipynb": "{}"}
    url = served_repo(git_server, tmp_path, files, "bytecode")
    with serving(tmp_path_factory, "bytecode", BINDERBOX_COMPILE_BYTECODE="true") as served:
        events = served.stream(f"/build/git/{quote(url, safe='')}/main")
        assert events[-1]["phase"] == "ready", events[-1]
        assert "building" in phases(events) and "launching" in phases(events)
        ready = events[-1]
        # Named with the setting: an image built without it is never taken for this one.
        assert "-o" in ready["image"].rsplit(":", 1)[1]
        assert image_present(ready["image"])
        # The session runs the compiled image: six's bytecode is there before any import
        # (find_spec locates the module without importing, so without compiling, it).
        compiled = (
            "import importlib.util as u, os; print(os.path.exists(u.cache_from_source("
            "u.find_spec('six').origin)))"
        )
        assert run_code(ready["url"], ready["token"], compiled).strip() == "True"
        assert run_code(ready["url"], ready["token"], "import six; print(6*7)").strip() == "42"


def test_a_build_under_a_cran_mirror_is_the_image_the_service_finds(
    base_image, built_images, git_server, tmp_path
):
    url = served_repo(git_server, tmp_path, {"a.txt": "a"}, "mirrored")
    mirror = "https://cran.example.org"
    with building_service(built_images, "cran", cran_mirror=mirror) as svc:
        events, _ = svc.events(build_path(url, build_only="true"))
        assert phases(events)[-2:] == ["built", "ready"], events[-1]
        image = events[-1]["image"]
        assert image_present(image)
        again, _ = svc.events(build_path(url, build_only="true"))
        assert phases(again) == ["fetching", "built", "ready"]
        assert again[-1]["image"] == image
