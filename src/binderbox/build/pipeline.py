"""One build, as named steps: resolve → name the image → reuse or fetch → detect → build."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from binderbox import __version__
from binderbox.build import base
from binderbox.build.detect import detect
from binderbox.build.engine import DockerEngine
from binderbox.build.plan import BuildPlan
from binderbox.build.render import REPO_IN_CONTEXT, SUPPORT_IN_CONTEXT, ImageOptions, render
from binderbox.config import Settings
from binderbox.errors import BaseImageUnavailable, ConfigError, UsageError
from binderbox.events import Emit, Event
from binderbox.naming import image_name_for
from binderbox.providers import Source


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked to build, with repo2docker's options."""

    source: Source
    image_name: str = ""
    subdir: str = ""
    user_id: int = 1000
    user_name: str = "jovyan"
    target_repo_dir: str = ""
    appendix: str = ""
    no_cache: bool = False

    def non_default_options(self, settings: Settings) -> dict[str, object]:
        defaults = BuildRequest(source=self.source)
        chosen = {
            key: value
            for key, value in asdict(self).items()
            if key not in {"source", "image_name", "no_cache"} and value != getattr(defaults, key)
        }
        if settings.base_image:
            chosen["base_image"] = settings.base_image
        return chosen


@dataclass(frozen=True)
class BuildResult:
    image: str
    commit: str
    reused: bool
    plan: BuildPlan | None
    seconds: float


def build_repository(request: BuildRequest, settings: Settings, emit: Emit) -> BuildResult:
    """Build (or reuse) the image for a repository, reporting progress through ``emit``."""
    started = time.monotonic()
    subdir = checked_subdir(request.subdir)
    source = request.source
    engine = DockerEngine.connect(settings.docker_cli)

    emit(Event("fetching", f"Resolving {_describe(source)}"))
    commit = source.resolve()
    image = request.image_name or (
        image_name_for(
            settings.image_prefix, source.slug(), commit, request.non_default_options(settings)
        )
        if commit
        else ""
    )
    if image and _reusable(engine, image, request, commit):
        emit(Event("built", f"Image {image} already exists; reusing it", {"image": image}))
        return BuildResult(image, commit, True, None, time.monotonic() - started)

    with tempfile.TemporaryDirectory(prefix="binderbox-build-") as tmp:
        context = Path(tmp)
        checkout = context / "checkout"
        emit(Event("fetching", f"Fetching {_describe(source)}"))
        fetched = source.fetch(checkout)
        commit = fetched.commit
        if not image:
            options = request.non_default_options(settings)
            image = image_name_for(settings.image_prefix, source.slug(), commit, options)
            if _reusable(engine, image, request, commit):
                emit(Event("built", f"Image {image} already exists; reusing it", {"image": image}))
                return BuildResult(image, commit, True, None, time.monotonic() - started)

        repo = checkout / subdir if subdir else checkout
        if not repo.is_dir():
            raise UsageError(f"--subdir '{subdir}' is not a folder in the repository.")
        repo = repo.rename(context / REPO_IN_CONTEXT)
        shutil.rmtree(checkout, ignore_errors=True)

        plan = detect(repo)
        for warning in plan.warnings:
            emit(Event("building", f"Warning: {warning}"))
        labels = {
            "binderbox.repo": source.repo_url,
            "binderbox.ref": source.ref,
            "binderbox.commit": commit,
            "binderbox.version": __version__,
            "repo2docker.repo": source.repo_url,
            "repo2docker.ref": source.ref or commit,
        }
        if request.subdir:
            labels["binderbox.subdir"] = subdir

        def log_line(line: str) -> None:
            emit(Event("building", line, log=True))

        if plan.dockerfile:
            emit(Event("building", f"Building {image} from {plan.dockerfile} as written"))
            try:
                engine.build(
                    repo,
                    repo / plan.dockerfile,
                    image,
                    labels=labels,
                    no_cache=request.no_cache,
                    timeout=settings.build_timeout,
                    on_line=log_line,
                )
            except BaseImageUnavailable as err:
                names = from_images((repo / plan.dockerfile).read_text(errors="replace"))
                raise BaseImageUnavailable(
                    f"The build failed: the base image {' or '.join(map(repr, names))} named in "
                    f"{plan.dockerfile} could not be pulled; is its registry reachable from "
                    "this machine?",
                    log_tail=err.log_tail,
                ) from None
        else:
            base_image, foreign = _base_for(plan, settings, engine, emit)
            options = ImageOptions(
                base_image=base_image,
                foreign_base=foreign,
                user_id=request.user_id,
                user_name=request.user_name,
                target_repo_dir=request.target_repo_dir,
                appendix=request.appendix,
                with_ca_bundle=bool(settings.ca_bundle),
            )
            recipe = render(plan, options)
            support = context / SUPPORT_IN_CONTEXT
            support.mkdir()
            for name, text in recipe.support_files.items():
                (support / name).write_text(text)
            if settings.ca_bundle:
                shutil.copyfile(settings.ca_bundle, support / "extra-ca.crt")
            dockerfile = context / "Dockerfile"
            dockerfile.write_text(recipe.dockerfile)
            (context / ".dockerignore").write_text("checkout\n")
            emit(Event("building", f"Building {image} on {base_image}"))
            engine.build(
                context,
                dockerfile,
                image,
                labels=labels,
                no_cache=request.no_cache,
                timeout=settings.build_timeout,
                steps=recipe.steps,
                on_line=log_line,
            )
    seconds = time.monotonic() - started
    emit(Event("built", f"Built {image} in {seconds:.1f} s", {"image": image}))
    return BuildResult(image, commit, False, plan, seconds)


def ensure_base(suite: str, settings: Settings, engine: DockerEngine, emit: Emit) -> str:
    """The base image for ``suite``, bootstrapping it once when it is missing."""
    found = base.find_base(engine, suite)
    if found:
        return found
    emit(Event("building", f"Building the {suite} base image once (about a minute)"))
    return base.build_base(
        engine,
        suite,
        mirror=settings.debian_mirror,
        ca_bundle=settings.ca_bundle,
        on_line=lambda line: emit(Event("building", line, log=True)),
    )


def choose_suite(python_version: str, settings: Settings) -> tuple[str, str]:
    """The base suite for a requested Python version, and a warning when it differs."""
    if not python_version:
        return settings.base_suite, ""
    for suite, shipped in base.SUITE_PYTHON.items():
        if shipped == python_version:
            return suite, ""
    available = ", ".join(f"{v} ({s})" for s, v in base.SUITE_PYTHON.items())
    if settings.python_fallback == "fail":
        raise ConfigError(
            f"runtime.txt asks for Python {python_version}, which binderbox cannot provide; "
            f"available: {available}."
        )

    def distance(item: tuple[str, str]) -> tuple[int, int]:
        want = tuple(int(x) for x in python_version.split("."))
        have = tuple(int(x) for x in item[1].split("."))
        return (abs(have[0] - want[0]), abs(have[1] - want[1]))

    suite, shipped = min(base.SUITE_PYTHON.items(), key=distance)
    return suite, (
        f"runtime.txt asks for Python {python_version}, which binderbox cannot provide; "
        f"using the nearest available, Python {shipped}."
    )


def _base_for(
    plan: BuildPlan, settings: Settings, engine: DockerEngine, emit: Emit
) -> tuple[str, bool]:
    if settings.base_image:
        if plan.python_version:
            emit(
                Event(
                    "building",
                    f"Warning: runtime.txt asks for Python {plan.python_version}; the custom "
                    f"base image {settings.base_image} decides which Python is used.",
                )
            )
        return settings.base_image, True
    suite, warning = choose_suite(plan.python_version, settings)
    if warning:
        emit(Event("building", f"Warning: {warning}"))
    return ensure_base(suite, settings, engine, emit), False


def from_images(dockerfile: str) -> list[str]:
    """The images a Dockerfile's FROM lines name (build stages excluded)."""
    images: list[str] = []
    stages: set[str] = set()
    for line in dockerfile.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            rest = [w for w in words[1:] if not w.startswith("--")]
            if rest and rest[0].lower() not in stages:
                images.append(rest[0])
            if len(rest) >= 3 and rest[1].upper() == "AS":
                stages.add(rest[2].lower())
    return images


def _reusable(engine: DockerEngine, image: str, request: BuildRequest, commit: str) -> bool:
    """An existing image is reused unless asked not to; a name the user chose must also
    hold this very repository and commit."""
    if request.no_cache or not commit:
        return False
    labels = engine.image_labels(image)
    if labels is None:
        return False
    if request.image_name:
        return (
            labels.get("binderbox.commit") == commit
            and labels.get("binderbox.repo") == request.source.repo_url
        )
    return True


def checked_subdir(subdir: str) -> str:
    """``--subdir`` as a clean relative path; UsageError when it points outside."""
    if not subdir:
        return ""
    path = PurePosixPath(subdir)
    if path.is_absolute() or ".." in path.parts:
        raise UsageError(f"--subdir '{subdir}' must be a relative path inside the repository.")
    return path.as_posix().strip("/")


def _describe(source: Source) -> str:
    return f"{source.repo_url} at {source.ref}" if source.ref else source.repo_url
