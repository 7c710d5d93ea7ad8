"""Check a repository's own Dockerfile before an untrusted build (pure: text in, problems out).

dockerd and BuildKit do some of a build's work themselves, in the host's network namespace
and with the host's Docker credentials, outside the firewall that holds build steps:
``ADD <url>`` and ``ADD <git ref>`` downloads, pulls of ``FROM`` and ``COPY --from``
images, ``# syntax=`` frontends, secret and ssh mounts. Cache mounts outlive the build and
are shared by every build on the daemon. A Dockerfile from an anonymous repository may use
none of these; what remains (``RUN`` steps, ``COPY``/``ADD`` from its own context, stages,
images from the public registries the operator lists) runs like any other build step.

The file is read the way dockerd 20.10's built-in frontend reads it (every line an
instruction, heredocs unknown) and the way newer frontends do (heredoc bodies are data);
a problem in either reading refuses the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Docker Hub under its other names, so one entry in the operator's list covers them.
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_DIRECTIVE = re.compile(r"^\s*#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*$")
_SYNTAX_COMMENT = re.compile(r"^\s*#\s*syntax\s*=", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# user@host:path, the scp-like form git (and BuildKit's ADD) take for a remote.
_GIT_SCP = re.compile(r"^[A-Za-z0-9._~-]+@[A-Za-z0-9.-]+:")
_HEREDOC = re.compile(r"<<(-?)\s*([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_QUOTE_LIMIT = 200
# The blanks Docker separates an instruction's words with.
_WORDS = re.compile(r"[ \t\v\f\r]+")


@dataclass(frozen=True)
class DockerfileProblem:
    """One refused line: its number (1-based), its text, and why, in one sentence."""

    line_number: int
    line: str
    reason: str

    def message(self, name: str = "Dockerfile") -> str:
        if not self.line_number:
            return f"The build argument {quote_line(self.line)} {self.reason}."
        return f"{name} line {self.line_number} ({quote_line(self.line)}) {self.reason}."


def quote_line(line: str) -> str:
    """A line for a message: control characters escaped, cut to about 200 characters."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line.strip())
    if len(shown) > _QUOTE_LIMIT:
        shown = shown[: _QUOTE_LIMIT - 1] + "…"
    return f"'{shown}'"


def registry_of(image: str) -> str:
    """The registry host (``host`` or ``host:port``) an image reference pulls from."""
    first, slash, _ = image.partition("/")
    # Docker's rule: a first part with '.', ':' or a capital letter, or 'localhost', is a host.
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        host = first.lower()
        return "docker.io" if host in _DOCKER_HUB else host
    return "docker.io"


def allowed_registries(text: str) -> frozenset[str]:
    """The operator's comma- or space-separated registry list, Docker Hub's aliases folded."""
    hosts = {h.strip().lower() for h in re.split(r"[,\s]+", text) if h.strip()}
    return frozenset("docker.io" if h in _DOCKER_HUB else h for h in hosts)


def check_dockerfile(
    text: str,
    registries: Iterable[str] = ("docker.io",),
    build_args: Mapping[str, str] | None = None,
) -> list[DockerfileProblem]:
    """Every line of ``text`` that an untrusted build may not have (empty: it may build)."""
    allowed = allowed_registries(",".join(registries))
    args = dict(build_args or {})
    problems: list[DockerfileProblem] = []
    for name in args:
        if name.upper().startswith("BUILDKIT_"):
            # BUILDKIT_SYNTAX as a build argument picks a frontend image like # syntax=.
            problems.append(
                DockerfileProblem(0, name, "is a BuildKit option, which is not allowed here")
            )
    # Lines as Docker reads them: split at newlines only, a carriage return before one dropped.
    physical = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    escape = _escape_character(physical)
    for number, line in enumerate(physical, 1):
        if _SYNTAX_COMMENT.match(line):
            problems.append(
                DockerfileProblem(
                    number,
                    line,
                    "asks BuildKit for a frontend image (# syntax=), which is not allowed here; "
                    "remove the line, the built-in Dockerfile syntax is used",
                )
            )
    seen: set[tuple[int, str]] = set()
    for heredocs in (False, True):
        for problem in _Checker(allowed, args).run(_logical_lines(physical, escape, heredocs)):
            key = (problem.line_number, problem.reason)
            if key not in seen:
                seen.add(key)
                problems.append(problem)
    return sorted(problems, key=lambda p: p.line_number)


def _escape_character(lines: list[str]) -> str:
    """The escape directive's character (``\\`` unless the file's first lines change it)."""
    escape = "\\"
    for line in lines:
        match = _DIRECTIVE.match(line)
        if not match:
            break
        if match[1].lower() == "escape" and match[2] in {"\\", "`"}:
            escape = match[2]
    return escape


def _logical_lines(lines: list[str], escape: str, heredocs: bool) -> Iterable[tuple[int, str]]:
    """(first line number, joined instruction) of each instruction.

    Joined as Docker joins them: the escape character (and blanks after it) removed and the
    next line appended as it is, with no space; comment and blank lines in between dropped.
    """
    continued = re.compile(re.escape(escape) + r"[ \t]*$")
    index = 0
    while index < len(lines):
        start = index
        raw = lines[index]
        index += 1
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        joined = raw.lstrip(" \t")
        while continued.search(joined):
            joined = continued.sub("", joined)
            while index < len(lines) and (
                not lines[index].strip() or lines[index].lstrip().startswith("#")
            ):
                index += 1
            if index >= len(lines):
                break
            joined += lines[index]
            index += 1
        yield start + 1, joined.strip()
        if heredocs and _WORDS.split(joined.strip(), maxsplit=1)[0].upper() in {
            "RUN",
            "COPY",
            "ADD",
        }:
            for dash, _, word in _HEREDOC.findall(joined):
                while index < len(lines):
                    body = lines[index].lstrip("\t") if dash else lines[index]
                    index += 1
                    if body == word:
                        break


class _Checker:
    def __init__(self, registries: frozenset[str], build_args: dict[str, str]) -> None:
        self.registries = registries
        self.build_args = build_args
        self.global_args: dict[str, str] = {}
        self.stage_vars: dict[str, str] = {}
        self.stages: list[str] = []
        self.problems: list[DockerfileProblem] = []
        self.number = 0
        self.line = ""

    def run(self, lines: Iterable[tuple[int, str]]) -> list[DockerfileProblem]:
        for number, joined in lines:
            # The instruction as Docker reads it (continuations joined) is what is quoted.
            self.number, self.line = number, joined
            self.instruction(joined)
        return self.problems

    def refuse(self, reason: str) -> None:
        self.problems.append(DockerfileProblem(self.number, self.line, reason))

    def instruction(self, text: str, onbuild: bool = False) -> None:
        keyword, *others = _WORDS.split(text.strip(), maxsplit=1)
        keyword = keyword.upper()
        rest = others[0].strip() if others else ""
        if keyword == "ONBUILD":
            # A trigger runs in the builds of images made FROM this one: the same rules.
            self.instruction(rest, onbuild=True)
        elif keyword == "FROM" and not onbuild:
            self.from_line(rest)
        elif keyword == "ARG":
            self.arg_line(rest)
        elif keyword == "ENV":
            self.env_line(rest)
        elif keyword == "ADD":
            self.add_line(rest)
        elif keyword == "COPY":
            self.copy_line(rest)
        elif keyword == "RUN":
            self.run_line(rest)

    # -- variables ---------------------------------------------------------------------

    def expand(self, value: str, names: Mapping[str, str]) -> str | None:
        """``value`` with $VAR, ${VAR}, ${VAR:-x}, ${VAR:+x} replaced; None if unknown."""
        unknown = False

        def replace(match: re.Match[str]) -> str:
            nonlocal unknown
            spec = match["braced"] if match["braced"] is not None else match["plain"]
            parts = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-+]?)(.*)", spec)
            if not parts:
                unknown = True
                return ""
            name, op, word = parts.groups()
            known = name in names
            if op in {":-", "-"}:
                return names[name] if known and (names[name] or op == "-") else word
            if op in {":+", "+"}:
                return word if known and (names[name] or op == "+") else ""
            if op or word or not known:
                unknown = True
                return ""
            return names[name]

        expanded = _VARIABLE.sub(replace, value)
        if unknown or "$" in expanded:
            return None
        return expanded

    def arg_line(self, rest: str) -> None:
        for item in _split_words(rest):
            name, equals, default = item.partition("=")
            value = self.build_args.get(name, _unquote(default) if equals else None)
            target = self.stage_vars if self.stages else self.global_args
            if value is not None:
                target[name] = value
            elif name in self.global_args and self.stages:
                # Re-declaring a global ARG inside a stage brings its value in.
                target[name] = self.global_args[name]

    def env_line(self, rest: str) -> None:
        first, *value = _WORDS.split(rest, maxsplit=1)
        if "=" not in first:
            self.stage_vars[first] = value[0].strip() if value else ""
            return
        for item in _split_words(rest):
            name, _, value = item.partition("=")
            self.stage_vars[name] = _unquote(value)

    # -- instructions ------------------------------------------------------------------

    def from_line(self, rest: str) -> None:
        words = [w for w in _WORDS.split(rest) if w and not w.startswith("--")]
        self.stage_vars = {}
        if not words:
            self.stages.append("")
            return
        image = self.expand(words[0], {**self.global_args})
        alias = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else ""
        if image is None:
            self.refuse(
                "names its image through a build argument binderbox cannot resolve; give "
                "the argument a default (ARG NAME=image) or write the image out"
            )
        else:
            self.check_image(image)
        self.stages.append(alias)

    def check_image(self, image: str) -> None:
        """A FROM image: an earlier stage, scratch, or one from an allowed registry."""
        name = image.lower()
        if name == "scratch" or name in self.stages:
            return
        registry = registry_of(image)
        if registry not in self.registries:
            self.refuse(
                f"pulls the image '{image}' from {registry}, which is not one of the "
                "registries this binderbox pulls from (" + ", ".join(sorted(self.registries)) + ")"
            )

    def is_stage(self, name: str) -> bool:
        return name in self.stages or (name.isdigit() and int(name) < len(self.stages))

    def stage_from(self, value: str, what: str) -> None:
        """``--from=`` of COPY or of a bind mount: only an earlier stage of this file."""
        expanded = self.expand(value, {**self.global_args, **self.stage_vars})
        if expanded is None or not self.is_stage(expanded.lower()):
            self.refuse(
                f"{what} from '{value}', which is not an earlier stage of this Dockerfile; "
                "only its own stages may be used here (copy the image's files in a FROM stage)"
            )

    def add_line(self, rest: str) -> None:
        flags, words = _flags(rest)
        for flag in flags:
            if flag.split("=", 1)[0] in {"--keep-git-dir", "--checksum"}:
                self.refuse("uses an ADD option for remote sources, which is not allowed here")
        for source in words[:-1]:
            expanded = self.expand(source, {**self.global_args, **self.stage_vars})
            if expanded is None:
                self.refuse(
                    "names an ADD source through a variable binderbox cannot resolve; write "
                    "the path out"
                )
            elif _URL.match(expanded) or _GIT_SCP.match(expanded):
                self.refuse(
                    "downloads with ADD, which dockerd does outside the build's network "
                    "limits and is not allowed here; put the file in the repository, or "
                    "download it in a RUN step (curl, pip, git)"
                )

    def copy_line(self, rest: str) -> None:
        flags, _ = _flags(rest)
        for flag in flags:
            name, _, value = flag.partition("=")
            if name == "--from":
                self.stage_from(value, "copies")

    def run_line(self, rest: str) -> None:
        flags, _ = _flags(rest)
        for flag in flags:
            name, _, value = flag.partition("=")
            if name == "--mount":
                self.mount(value)
            elif name == "--network" and value not in {"default", "none"}:
                self.refuse(f"asks for the network '{value}', which is not allowed here")
            elif name == "--security":
                self.refuse("asks for extra privileges (--security), which is not allowed here")

    def mount(self, spec: str) -> None:
        options: dict[str, str] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            options[key.strip().lower()] = value.strip()
        kind = options.get("type", "bind").lower()
        if kind in {"secret", "ssh"}:
            what = "a secret" if kind == "secret" else "the ssh agent"
            self.refuse(f"mounts {what} of the machine that builds it, which is not allowed here")
        elif kind == "cache":
            self.refuse(
                "uses a cache mount, which outlives the build and is shared with other "
                "repositories' builds, so it is not allowed here"
            )
        elif kind not in {"bind", "tmpfs"}:
            self.refuse(f"uses a mount of type '{kind}', which is not allowed here")
        elif "from" in options:
            self.stage_from(options["from"], "mounts files")


def _flags(rest: str) -> tuple[list[str], list[str]]:
    """Leading ``--flag[=value]`` words (lowercase names) and the remaining arguments,
    the JSON form understood."""
    flags = []
    while match := re.match(r"--(\S*)[ \t\v\f\r]*", rest):
        name, equals, value = match[1].partition("=")
        flags.append(f"--{name.lower()}{equals}{_unquote(value)}")
        rest = rest[match.end() :]
    if rest.startswith("["):
        try:
            parsed = json.loads(rest)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return flags, parsed
    return flags, _split_words(rest)


def _split_words(text: str) -> list[str]:
    """Words separated by whitespace, quotes kept together (and removed)."""
    words: list[str] = []
    current = ""
    quote = ""
    started = False
    for char in text:
        if quote:
            if char == quote:
                quote = ""
            else:
                current += char
        elif char in "\"'":
            quote = char
            started = True
        elif char in " \t\v\f\r":
            if started or current:
                words.append(current)
            current, started = "", False
        else:
            current += char
            started = True
    if started or current:
        words.append(current)
    return words


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def refusal(
    text: str, name: str, registries: Iterable[str], build_args: Mapping[str, str] | None = None
) -> str:
    """The one-sentence refusal for a Dockerfile with problems, or "" when it may build."""
    problems = check_dockerfile(text, registries, build_args)
    if not problems:
        return ""
    more = len(problems) - 1
    first = problems[0].message(name)
    if more:
        first = first[:-1] + f" (and {more} more line{'s' if more > 1 else ''} like it)."
    return first
