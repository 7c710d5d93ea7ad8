"""One build, as named steps: resolve → name the image → reuse or fetch → detect → build."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath

import docker.errors
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from binderbox import __version__
from binderbox.builder import base, lock, repofiles, stack
from binderbox.builder.cache import load_cache_secret
from binderbox.builder.detect import detect
from binderbox.builder.dockerfile_check import refusal
from binderbox.builder.engine import DockerEngine
from binderbox.builder.lock import Lock
from binderbox.builder.plan import AptPackage, BuildPlan
from binderbox.builder.render import REPO_IN_CONTEXT, SUPPORT_IN_CONTEXT, ImageOptions, render
from binderbox.config import Settings
from binderbox.errors import BaseImageUnavailable, BinderboxError, ConfigError, UsageError
from binderbox.events import Emit, Event
from binderbox.naming import image_name_for
from binderbox.providers import LocalSource, RecordSource, Source


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
    # (KEY, VALUE) pairs: extra image labels, and build arguments for a Dockerfile.
    labels: tuple[tuple[str, str], ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    # Rebuild exactly the environment of this lock (binderbox build --from-lock).
    lock: Lock | None = None

    def non_default_options(self) -> dict[str, object]:
        """The options of this request that change the image and differ from the defaults
        (the operator's settings are added by naming.image_name_for); a lock counts by
        its digest."""
        defaults = BuildRequest(source=self.source)
        chosen: dict[str, object] = {}
        for option in fields(self):
            key, value = option.name, getattr(self, option.name)
            if key in {"source", "image_name", "no_cache"} or value == getattr(defaults, key):
                continue
            chosen[key] = value.digest() if isinstance(value, Lock) else value
        return chosen

    def image_for(self, settings: Settings, commit: str) -> str:
        """The name of this request's image for ``commit`` (or content id)."""
        return image_name_for(settings, self.source.slug(), commit, self.non_default_options())


@dataclass(frozen=True)
class BuildResult:
    image: str
    commit: str
    reused: bool
    plan: BuildPlan | None
    seconds: float
    # The build's lock file (builder/lock.py); "" for a reused image, or when it could
    # not be recorded (a warning said why).
    lock: str = ""


def build_repository(
    request: BuildRequest, settings: Settings, emit: Emit, engine: DockerEngine | None = None
) -> BuildResult:
    """Build (or reuse) the image for a repository, reporting progress through ``emit``;
    on this machine's dockerd, or on ``engine``'s (a build node)."""
    started = time.monotonic()
    subdir = checked_subdir(request.subdir)
    source = request.source
    engine = engine or DockerEngine.connect(settings.docker_cli)

    emit(Event("fetching", f"Resolving {_describe(source)}"))
    commit = source.resolve()
    image = request.image_name or (request.image_for(settings, commit) if commit else "")
    if image and _reusable(engine, image, request, commit):
        emit(Event("built", f"Image {image} already exists; reusing it", {"image": image}))
        return BuildResult(image, commit, True, None, time.monotonic() - started)

    with tempfile.TemporaryDirectory(prefix="binderbox-build-") as tmp:
        context = Path(tmp)
        checkout = context / "checkout"
        emit(Event("fetching", f"Fetching {_describe(source)}"))
        fetched = source.fetch(checkout)
        commit = fetched.commit
        if request.lock:
            check_locked_commit(request.lock, source, commit, emit)
        if not image:
            image = request.image_for(settings, commit)
            if _reusable(engine, image, request, commit):
                emit(Event("built", f"Image {image} already exists; reusing it", {"image": image}))
                return BuildResult(image, commit, True, None, time.monotonic() - started)

        # A --subdir must be a folder, not a link to one: only it is kept (and checked).
        if subdir and not repofiles.real_folder(checkout, subdir):
            raise UsageError(f"--subdir '{subdir}' is not a folder in the repository.")
        repo = checkout / subdir if subdir else checkout
        # Before anything reads it: no links out of the folder that is built, no pipes or
        # devices. The user's own folder keeps its links out, with a warning.
        own_folder = bool(getattr(source, "own_folder", False))
        where = f"--subdir '{subdir}'" if subdir else ("the folder" if own_folder else "")
        for warning in repofiles.check_checkout(repo, own_folder=own_folder, label=where):
            emit(Event("building", f"Warning: {warning}"))
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
            lock.LABEL_PROVIDER: provider_of(source),
            "repo2docker.repo": source.repo_url,
            "repo2docker.ref": source.ref or commit,
        }
        if request.subdir:
            labels["binderbox.subdir"] = subdir
        if request.lock:
            labels[lock.LABEL_FROM_LOCK] = request.lock.digest()
        labels.update(dict(request.labels))

        def log_line(line: str) -> None:
            emit(Event("building", line, log=True))

        if plan.dockerfile:
            # Service builds (check_remote_hosts) are of anonymous repositories: untrusted.
            untrusted = settings.check_remote_hosts
            if untrusted:
                check_repository_dockerfile(repo, plan.dockerfile, settings, request.build_args)
            emit(Event("building", f"Building {image} from {plan.dockerfile} as written"))
            # Docker reads only <context>/.dockerignore; bring the one that applies there.
            # Never through a link: the root's .dockerignore is replaced, not written to.
            ignore = ignore_file(repo, plan.config_dir)
            if ignore and ignore != ".dockerignore":
                repofiles.write_new(repo / ".dockerignore", repofiles.read_text(repo, ignore))
            try:
                engine.build(
                    repo,
                    repo / plan.dockerfile,
                    image,
                    labels=labels,
                    build_args=dict(request.build_args),
                    no_cache=request.no_cache,
                    timeout=settings.build_timeout,
                    on_line=log_line,
                    # No registry credentials of this machine for an untrusted Dockerfile.
                    docker_config=_empty_folder(context / "docker-config") if untrusted else None,
                )
            except BaseImageUnavailable as err:
                dockerfile_text = repofiles.read_bytes(repo, plan.dockerfile)
                names = from_images(dockerfile_text.decode(errors="replace"))
                raise BaseImageUnavailable(
                    f"The build failed: the base image {' or '.join(map(repr, names))} named in "
                    f"{plan.dockerfile} could not be pulled; this machine may not reach its "
                    "registry.",
                    log_tail=err.log_tail,
                ) from None
        else:
            if request.lock:
                base_image, foreign = locked_base(request.lock, engine, emit)
                plan, settings, locked_python = _locked_plan(plan, request.lock, settings)
            else:
                base_image, foreign = _base_for(plan, settings, engine, emit)
                locked_python = ()
            labels.update(_base_labels(engine, base_image, foreign))
            options = ImageOptions(
                base_image=base_image,
                foreign_base=foreign,
                user_id=request.user_id,
                user_name=request.user_name,
                target_repo_dir=request.target_repo_dir,
                appendix=request.appendix,
                with_ca_bundle=bool(settings.ca_bundle),
                cran_mirror=settings.cran_mirror,
                compile_bytecode=settings.compile_bytecode,
                index_url=settings.index_url,
                cache_secret=load_cache_secret(settings.state_dir),
                repository_slug=source.slug(),
                locked_python=locked_python,
                locked_apt=request.lock is not None,
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
            (context / ".dockerignore").write_text(
                "checkout\n" + "".join(f"{p}\n" for p in ignore_patterns(repo, plan.config_dir))
            )
            emit(Event("building", f"Building {image} on {base_image}"))
            engine.build(
                context,
                dockerfile,
                image,
                labels=labels,
                build_args=dict(request.build_args),
                no_cache=request.no_cache,
                timeout=settings.build_timeout,
                steps=recipe.steps,
                on_line=log_line,
                hidden=recipe.hidden,
            )
        if plan.dockerfile:
            check_jupyter_server(engine, image, plan.dockerfile, settings, emit)
    recorded = record_lock(engine, image, request.lock, emit)
    seconds = time.monotonic() - started
    emit(Event("built", f"Built {image} in {seconds:.1f} s", {"image": image}))
    return BuildResult(image, commit, False, plan, seconds, recorded.text() if recorded else "")


def check_locked_commit(wanted: Lock, source: Source, commit: str, emit: Emit) -> None:
    """A rebuild from a lock builds the locked commit: a git repository or record whose
    content is not the locked one is refused; a folder that differs is built with a
    warning (it may be your own edited copy)."""
    locked = wanted.repository
    if provider_of(source) != locked.provider or commit == locked.commit:
        return
    if isinstance(source, LocalSource):
        emit(
            Event(
                "building",
                f"Warning: the folder's content ({commit[:12]}) is not the locked content "
                f"({locked.commit[:12]}); it is built as it is now.",
            )
        )
        return
    raise UsageError(
        f"{source.repo_url} is at {commit[:12]} now, not at the locked {locked.commit[:12]}; "
        "binderbox rebuilds a lock only from its own commit."
    )


def provider_of(source: Source) -> str:
    """The kind of repository, as locks name it: git, local, or a record's provider."""
    if isinstance(source, LocalSource):
        return "local"
    if isinstance(source, RecordSource):
        return source.provider
    return "git"


def _base_labels(engine: DockerEngine, base_image: str, foreign: bool) -> dict[str, str]:
    """What the lock needs to know of the base: its name, content digest (image id) and
    registry digests. A base not here yet (BuildKit pulls it) has no digest to record."""
    attrs = engine.image_attrs(base_image) or {}
    return {
        lock.LABEL_BASE_IMAGE: base_image,
        lock.LABEL_BASE_ID: str(attrs.get("Id", "")),
        lock.LABEL_BASE_DIGESTS: ",".join(attrs.get("RepoDigests") or []),
        lock.LABEL_BASE_KIND: "other" if foreign else "binderbox",
    }


def image_lock(engine: DockerEngine, image: str) -> Lock:
    """The lock of a built image: its labels, its environment variables and the file its
    last build step wrote. LockError (one sentence) when the image has none."""
    attrs = engine.image_attrs(image)
    if attrs is None:
        raise lock.LockError(f"There is no image {image} to read a lock from.")
    config = attrs.get("Config") or {}
    labels = dict(config.get("Labels") or {})
    if "binderbox.commit" not in labels:
        raise lock.LockError(f"The image {image} was not built by binderbox; it has no lock.")
    env = [item for item in config.get("Env") or [] if isinstance(item, str) and "=" in item]
    variables = dict(item.split("=", 1) for item in env)
    environment = None
    if lock.LABEL_BASE_IMAGE in labels:  # rendered, so its last step wrote the file
        environment = engine.read_file(image, lock.ENVIRONMENT_FILE, lock.MAX_LOCK_BYTES)
        if environment is None:
            raise lock.LockError(
                f"The image {image} holds no {lock.ENVIRONMENT_FILE} (built by an older "
                "binderbox?); rebuild it with --no-cache for a lock."
            )
    created = str(attrs.get("Created", ""))[:19] + "Z" if attrs.get("Created") else ""
    return lock.lock_from_image(labels, variables, environment, image=image, created=created)


def record_lock(engine: DockerEngine, image: str, wanted: Lock | None, emit: Emit) -> Lock | None:
    """Read the lock of the image just built; a rebuild from ``wanted`` is compared with
    it. A lock that cannot be read is a warning, never a failed build."""
    try:
        recorded = image_lock(engine, image)
    except (BinderboxError, docker.errors.DockerException) as error:
        reason = error.message if isinstance(error, BinderboxError) else str(error)
        emit(Event("building", f"Warning: the build's lock could not be recorded: {reason}"))
        return None
    if wanted is None:
        return recorded
    if not wanted.has_environment:
        emit(
            Event(
                "building",
                "Warning: the lock records no environment (the image was built from a "
                "Dockerfile), so only the repository's commit was reproduced.",
            )
        )
        return recorded
    changed = lock.differences(wanted, recorded)
    if changed:
        emit(
            Event(
                "building",
                "Warning: the rebuilt environment differs from the lock: " + "; ".join(changed),
                {"lock_differences": changed},
            )
        )
    else:
        python = len(recorded.python.packages) if recorded.python else 0
        debian = len(recorded.debian or ())
        emit(
            Event(
                "building",
                f"The rebuilt environment matches the lock: {python} Python packages and "
                f"{debian} Debian packages beyond the base, the same base image.",
            )
        )
    return recorded


def locked_base(wanted: Lock, engine: DockerEngine, emit: Emit) -> tuple[str, bool]:
    """The image to build on for a rebuild from a lock: a local image with the locked
    digest (named as the lock names it when that name still points there, else under a
    name binderbox gives it), or pulled by its registry digest; BaseImageUnavailable,
    one sentence, when it is neither here nor to be got."""
    locked = wanted.base
    foreign = not locked.binderbox_base
    if not locked.id:
        raise BaseImageUnavailable(
            "The lock does not record its base image's digest, so its environment cannot "
            "be rebuilt exactly."
        )
    named = engine.image_attrs(locked.image) if locked.image else None
    if named and named.get("Id") == locked.id:
        return locked.image, foreign
    found = engine.image_attrs(locked.id)
    if found is None:
        for reference in locked.repo_digests:
            emit(Event("building", f"Pulling the locked base image {reference}"))
            if engine.pull(reference):
                found = engine.image_attrs(locked.id)
                if found is not None:
                    break
    if found is None:
        raise BaseImageUnavailable(
            f"The lock's base image {locked.image or 'of the lock'} ({locked.id}) is not on this "
            "machine and cannot be got: load a saved copy of it (docker load) and try again."
        )
    tags = [t for t in found.get("RepoTags") or [] if t and "<none>" not in t]
    if tags:
        return tags[0], foreign
    name = f"{base.BASE_REPOSITORY}:locked-{locked.id.removeprefix('sha256:')[:12]}"
    engine.tag(locked.id, name)
    return name, foreign


def _locked_plan(
    plan: BuildPlan, wanted: Lock, settings: Settings
) -> tuple[BuildPlan, Settings, tuple[str, ...]]:
    """The plan of a rebuild from a lock: every Debian package the build added, at its
    locked version, in place of apt.txt's; the locked Python packages to install first;
    R's packages from the CRAN mirror the lock names (unless the operator set one)."""
    if wanted.debian is not None:
        plan = replace(
            plan, apt_packages=tuple(AptPackage(p.name, p.version) for p in wanted.debian)
        )
    if wanted.r and wanted.r.cran_mirror and not settings.cran_mirror:
        settings = settings.with_overrides(cran_mirror=wanted.r.cran_mirror)
    python = tuple(p.pin() for p in wanted.python.packages) if wanted.python else ()
    return plan, settings, python


def check_repository_dockerfile(
    repo: Path, dockerfile: str, settings: Settings, build_args: tuple[tuple[str, str], ...]
) -> None:
    """Refuse (ConfigError, one sentence) a repository Dockerfile an untrusted build may not
    run: see dockerfile_check and the README's "Dockerfiles on a public binderbox"."""
    if settings.repository_dockerfiles == "refused":
        raise ConfigError(
            f"This binderbox does not build repositories' own Dockerfiles ({dockerfile}); "
            "describe the environment with requirements.txt, environment.yml, apt.txt and "
            "postBuild instead."
        )
    text = repofiles.read_bytes(repo, dockerfile).decode(errors="replace")
    problem = refusal(text, dockerfile, settings.dockerfile_registries.split(","), dict(build_args))
    if problem:
        raise ConfigError(problem)


def check_jupyter_server(
    engine: DockerEngine, image: str, dockerfile: str, settings: Settings, emit: Emit
) -> None:
    """A session starts ``jupyter server`` in the image: say so now if it cannot.

    In service builds the image is removed and the build fails; elsewhere it is a warning.
    """
    found = engine.has_jupyter_server(image, stack.BASE_USER_ID)
    if found is not False:
        return
    message = (
        f"The image built from {dockerfile} has no Jupyter server: sessions run "
        "'jupyter server' as user 1000, so the Dockerfile must install jupyter-server on "
        "its PATH (pip install jupyterlab brings it)."
    )
    if not settings.check_remote_hosts:
        emit(Event("building", f"Warning: {message}"))
        return
    engine.remove_image(image)
    raise ConfigError(message)


def _empty_folder(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


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
        index_url=settings.index_url,
        on_line=lambda line: emit(Event("building", line, log=True)),
    )


# Where a requested Python version comes from, for messages.
_PYTHON_FROM = "runtime.txt, environment.yml or Pipfile"


def choose_suite(
    python_version: str, settings: Settings, python_requires: str = ""
) -> tuple[str, str]:
    """The base suite for a requested Python version, and a warning when it differs.

    ``python_requires`` (a PEP 440 range) applies when no exact version is asked for:
    the default suite if its Python fits, else the newest suite whose Python does.
    """
    if not python_version and python_requires:
        return _suite_for_range(python_requires, settings)
    if not python_version:
        return settings.base_suite, ""
    for suite, shipped in base.SUITE_PYTHON.items():
        if shipped == python_version:
            return suite, ""
    available = ", ".join(f"{v} ({s})" for s, v in base.SUITE_PYTHON.items())
    if settings.python_fallback == "fail":
        raise ConfigError(
            f"The repository asks for Python {python_version} ({_PYTHON_FROM}), which binderbox "
            f"cannot provide; available: {available}."
        )

    def distance(item: tuple[str, str]) -> tuple[int, int]:
        want = tuple(int(x) for x in python_version.split("."))
        have = tuple(int(x) for x in item[1].split("."))
        return (abs(have[0] - want[0]), abs(have[1] - want[1]))

    suite, shipped = min(base.SUITE_PYTHON.items(), key=distance)
    return suite, (
        f"The repository asks for Python {python_version} ({_PYTHON_FROM}), which binderbox "
        f"cannot provide; using the nearest available, Python {shipped}."
    )


def _suite_for_range(python_requires: str, settings: Settings) -> tuple[str, str]:
    spec = SpecifierSet(python_requires)
    shipped = base.SUITE_PYTHON
    if spec.contains(shipped[settings.base_suite]):
        return settings.base_suite, ""
    fitting = [s for s, v in shipped.items() if spec.contains(v)]
    if fitting:
        return max(fitting, key=lambda s: Version(shipped[s])), ""
    available = ", ".join(f"{v} ({s})" for s, v in shipped.items())
    message = (
        f"The repository needs Python {python_requires} (requires-python or environment.yml), "
        f"which binderbox cannot provide; available: {available}"
    )
    if settings.python_fallback == "fail":
        raise ConfigError(message + ".")
    return settings.base_suite, f"{message}; using Python {shipped[settings.base_suite]}."


def choose_r_suite(r_version: str, settings: Settings, python_suite: str = "") -> tuple[str, str]:
    """The base suite for a requested R version, and a warning when its R differs.

    ``python_suite`` is the suite a requested Python already decided on; R then comes
    from that suite whatever its version.
    """
    shipped_by = {python_suite: base.SUITE_R[python_suite]} if python_suite else base.SUITE_R
    preferred = python_suite or settings.base_suite
    if not r_version:
        return preferred, ""
    want = _version_tuple(r_version)
    matching = [s for s, v in shipped_by.items() if _version_tuple(v)[: len(want)] == want]
    if matching:
        return (preferred if preferred in matching else matching[0]), ""
    available = ", ".join(f"R {v} ({s})" for s, v in shipped_by.items())
    if settings.r_version_fallback == "fail":
        raise ConfigError(
            f"runtime.txt asks for R {r_version}, which binderbox cannot provide (Debian ships "
            f"one R per release); available: {available}."
        )

    def distance(suite: str) -> int:
        # Minor versions as steps along one line: 3.6 is nearer to 4.2 than to 4.5.
        have = _version_tuple(shipped_by[suite])
        return abs((have[0] - want[0]) * 100 + have[1] - want[1])

    suite = min(shipped_by, key=distance)
    return suite, (
        f"runtime.txt asks for R {r_version}, which binderbox cannot provide; using the "
        f"nearest available, R {shipped_by[suite]} from Debian {suite}."
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def _base_for(
    plan: BuildPlan, settings: Settings, engine: DockerEngine, emit: Emit
) -> tuple[str, bool]:
    r_version = plan.r.version if plan.r else ""
    if settings.base_image:
        if plan.python_version:
            emit(
                Event(
                    "building",
                    f"Warning: the repository asks for Python {plan.python_version} "
                    f"({_PYTHON_FROM}); the custom base image {settings.base_image} decides "
                    "which Python is used.",
                )
            )
        if r_version:
            emit(
                Event(
                    "building",
                    f"Warning: runtime.txt asks for R {r_version}; the Debian release of the "
                    f"custom base image {settings.base_image} decides which R is used.",
                )
            )
        return settings.base_image, True
    suite, warning = choose_suite(plan.python_version, settings, plan.python_requires)
    if warning:
        emit(Event("building", f"Warning: {warning}"))
    if plan.r:
        suite, warning = choose_r_suite(r_version, settings, suite if plan.python_version else "")
        if warning:
            emit(Event("building", f"Warning: {warning}"))
    return ensure_base(suite, settings, engine, emit), False


def ignore_file(repo: Path, config_dir: str) -> str:
    """The .dockerignore (or .containerignore) that applies, relative to the repository:
    the binder dir's, if any; "" for none."""
    for name in (".dockerignore", ".containerignore"):
        rel = f"{config_dir}/{name}" if config_dir else name
        if repofiles.is_file(repo, rel):
            return rel
    return ""


def ignore_patterns(repo: Path, config_dir: str) -> list[str]:
    """The repository's ignore patterns, rewritten for the ``repo/`` folder of our context."""
    rel = ignore_file(repo, config_dir)
    if not rel:
        return []
    patterns = []
    for raw in repofiles.read_bytes(repo, rel).decode(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip().lstrip("/")
        # A pattern reaching out of the repository could hide binderbox's own files.
        if not pattern or ".." in PurePosixPath(pattern).parts:
            continue
        patterns.append(("!" if negate else "") + f"{REPO_IN_CONTEXT}/{pattern}")
    return patterns


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
    if request.lock and labels.get(lock.LABEL_FROM_LOCK) != request.lock.digest():
        return False  # a name the user chose, holding an image not built from this lock
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
