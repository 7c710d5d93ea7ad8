"""The shared uv cache cannot be poisoned: a repository whose setup.py (a path requirement
built from source) rewrites every cached copy of a package, and one whose Dockerfile mounts
the shared cache by name, leave a clean repository's image exactly as it was. Real builds
through the service; the render rules behind it are pure tests."""

from __future__ import annotations

import docker
import pytest
from tests.test_service_build import build_path, building_service, phases, served_repo

from binderbox.builder.cache import cache_key, load_cache_secret
from binderbox.builder.plan import AptPackage, BuildPlan, Requirements
from binderbox.builder.render import ImageOptions, render

SECRET = "ab" * 32


def recipe(plan: BuildPlan, slug: str = "git-example-org-repo"):
    options = ImageOptions(
        base_image="binderbox/base:bookworm", cache_secret=SECRET, repository_slug=slug
    )
    return render(plan, options)


def test_cache_ids_carry_the_deployment_key_and_are_hidden():
    requirements = Requirements("requirements.txt", local=False)
    plan = BuildPlan(requirements=requirements, install_project="setup.py")
    result = recipe(plan)
    shared, private = result.hidden
    assert f"id=binderbox-uv-1000-{shared}," in result.dockerfile
    assert f"id=binderbox-uv-1000-{private}," in result.dockerfile
    assert "id=binderbox-uv-1000," not in result.dockerfile
    assert private not in recipe(plan, "git-example-org-other").hidden
    assert SECRET not in result.dockerfile


def test_nothing_is_built_from_source_beside_the_shared_cache():
    shared_and_local = (
        Requirements("requirements.txt", local=False),
        Requirements("r.txt", local=True),
    )
    for requirements in shared_and_local:
        plan = BuildPlan(requirements=requirements, install_project="setup.py")
        result = recipe(plan)
        shared = result.hidden[0]
        for line in result.dockerfile.splitlines():
            if shared in line:
                assert "--no-build" in line, line
                assert "uv pip install --python /srv/venv/bin/python . " not in line
        project = [line for line in result.dockerfile.splitlines() if "python ." in line]
        assert project and shared not in project[0]


def test_apt_caches_are_keyed_too():
    result = recipe(BuildPlan(apt_packages=(AptPackage("curl"),)))
    assert f"id=binderbox-apt-cache-{result.hidden[0]}," in result.dockerfile


POISON_SETUP = """
import os
from setuptools import setup

# The attack: rewrite every cached copy of six that this build can reach.
for root, dirs, files in os.walk("/var/cache/binderbox/uv"):
    for name in files:
        if name == "six.py":
            with open(os.path.join(root, name), "a") as handle:
                handle.write("\\nPOISONED = True\\n")
try:
    with open("/var/cache/binderbox/uv/binderbox-poisoned", "w") as handle:
        handle.write("x")
except OSError:
    pass  # no cache at that place in this build
setup(name="poison", version="1.0", py_modules=[])
"""

HASH_SIX = "sha256sum /srv/venv/lib/python3.11/site-packages/six.py"


def six_hash(image: str) -> str:
    out = docker.from_env().containers.run(image, ["sh", "-c", HASH_SIX], remove=True)
    return out.decode().split()[0]


@pytest.mark.docker
def test_a_poisoning_sdist_and_dockerfile_leave_other_images_untouched(
    base_image, built_images, git_server, tmp_path
):
    requirements = "six==1.16.0\n"
    with building_service(built_images, "cache") as svc:
        before_url = served_repo(
            git_server, tmp_path, {"requirements.txt": requirements, "a.txt": "1"}, "clean-a"
        )
        events, _ = svc.events(build_path(before_url, build_only="true"))
        assert phases(events)[-1] == "ready", events[-1]
        before = six_hash(events[-1]["image"])

        # A path requirement: its setup.py runs while the repository's requirements install.
        attack = {
            "requirements.txt": requirements + "./poison\n",
            "poison/setup.py": POISON_SETUP,
        }
        url = served_repo(git_server, tmp_path, attack, "poison-sdist")
        events, _ = svc.events(build_path(url, build_only="true"))
        assert phases(events)[-1] == "ready", events[-1]
        log = "\n".join(e["message"] for e in events)
        assert "built from source" in log
        # The cache ids' keys never reach a log anyone can read.
        shared_key = cache_key(load_cache_secret(svc.state_dir), "shared")
        assert shared_key not in log and "id=binderbox-uv-1000-…" in log

        dockerfile = {
            "Dockerfile": (
                f"FROM {base_image}\n"
                "RUN --mount=type=cache,id=binderbox-uv-1000,target=/c,uid=1000 "
                "find /c -name six.py -exec sh -c 'echo POISONED >> $0' {} \\;\n"
            )
        }
        url = served_repo(git_server, tmp_path, dockerfile, "poison-dockerfile")
        events, _ = svc.events(build_path(url, build_only="true"))
        assert events[-1]["phase"] == "failed"
        assert "uses a cache mount" in events[-1]["message"]

        after_url = served_repo(
            git_server, tmp_path, {"requirements.txt": requirements, "b.txt": "2"}, "clean-b"
        )
        events, _ = svc.events(build_path(after_url, build_only="true"))
        assert phases(events)[-1] == "ready", events[-1]
        assert six_hash(events[-1]["image"]) == before


@pytest.mark.docker
def test_a_legitimate_sdist_still_builds(base_image, built_images, git_server, tmp_path):
    files = {
        "requirements.txt": "./mypkg\n",
        "mypkg/setup.py": "from setuptools import setup\nsetup(name='mypkg', version='1.0',"
        " py_modules=['mypkg'])\n",
        "mypkg/mypkg.py": "ANSWER = 42\n",
    }
    with building_service(built_images, "sdist") as svc:
        url = served_repo(git_server, tmp_path, files, "legit-sdist")
        events, _ = svc.events(build_path(url, build_only="true"))
    assert phases(events)[-1] == "ready", events[-1]
    out = docker.from_env().containers.run(
        events[-1]["image"],
        ["python", "-c", "import mypkg; print(mypkg.ANSWER)"],
        remove=True,
    )
    assert out.decode().strip() == "42"
