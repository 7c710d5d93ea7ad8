"""One typed settings object, read from a TOML file, ``BINDERBOX_*`` variables and flags.

Precedence, lowest first: defaults, the TOML file, the environment, command-line flags.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from binderbox.builder import package_index, r_support
from binderbox.errors import UsageError

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _default_docker_cli() -> str:
    # The docker.io CLI builds with BuildKit by itself; a newer CLI may insist on buildx.
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker") or "docker"


def _default_ca_bundle() -> str:
    return str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.exists() else ""


def _default_state_dir() -> str:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "binderbox")


@dataclass(frozen=True)
class Settings:
    """Everything an operator or user can configure."""

    # Docker CLI used for BuildKit builds (the SDK is used for everything else).
    docker_cli: str = dataclasses.field(default_factory=_default_docker_cli)
    # Debian suite of the base image built by `binderbox base`.
    base_suite: str = "bookworm"
    # Any Debian/Ubuntu image to use instead of the built base (needs registry access).
    base_image: str = ""
    # Debian mirror for mmdebstrap; empty means mmdebstrap's default.
    debian_mirror: str = ""
    # Extra CA bundle trusted by builds and by the running image; empty disables.
    ca_bundle: str = dataclasses.field(default_factory=_default_ca_bundle)
    # Prefix of every built image name; bump it to force rebuilds.
    image_prefix: str = "binderbox-"
    # Seconds a build may run before it is stopped.
    build_timeout: int = 3600
    # What to do when runtime.txt asks for a Python no base ships: "nearest" or "fail".
    python_fallback: str = "nearest"
    # What to do when runtime.txt asks for an R no Debian suite ships: "nearest" or "fail".
    r_version_fallback: str = "nearest"
    # CRAN mirror of R images (install.R, DESCRIPTION, install.packages() at runtime); empty
    # means the snapshot of runtime.txt's date on Posit Package Manager, else cloud.r-project.org.
    cran_mirror: str = ""
    # The Python package index every build installs from (requirements.txt, Pipfile,
    # environment.yml's pip section, setup.py, the server stack on other bases): a PyPI
    # mirror such as devpi, Artifactory or Nexus. Sources naming PyPI itself mean this one.
    index_url: str = package_index.DEFAULT_INDEX

    # Content providers (DOIs and research-data records). Lists are base URLs separated by
    # commas or spaces. The DOI resolver that turns a DOI into the record's landing page.
    doi_resolver: str = "https://doi.org"
    # Zenodo (sandbox.zenodo.org is known too), plus other InvenioRDM sites to treat alike.
    zenodo_url: str = "https://zenodo.org"
    zenodo_hosts: str = ""
    # Figshare's site (any *.figshare.com portal is known too), its API, and other portals.
    figshare_url: str = "https://figshare.com"
    figshare_api_url: str = "https://api.figshare.com/v2"
    figshare_hosts: str = ""
    # Dataverse installations besides the well-known ones binderbox lists.
    dataverse_hosts: str = ""
    # HydroShare.
    hydroshare_url: str = "https://www.hydroshare.org"
    # CKAN sites used without asking them first (other hosts must answer status_show).
    ckan_hosts: str = ""
    # Limits on one record's content, counted while downloading and again while unpacking.
    # Optional API tokens (for higher rate limits or records shared with the token's
    # owner), sent only to the hosts set for that provider (zenodo_url and zenodo_hosts,
    # figshare_api_url, dataverse_hosts, hydroshare_url, ckan_hosts), never discovered ones.
    zenodo_token: str = ""
    figshare_token: str = ""
    dataverse_token: str = ""
    hydroshare_token: str = ""
    ckan_token: str = ""
    content_max_bytes: int = 2_000_000_000
    content_max_files: int = 20_000
    # Limits on one git repository (submodules included), counted while cloning and again
    # before checking out; the whole fetch's time, and how long a transfer may run below
    # 1 kB/s before git gives up.
    git_max_bytes: int = 2_000_000_000
    git_max_files: int = 100_000
    git_timeout: float = 600
    git_low_speed_seconds: int = 60
    # Largest answer (decoded) a record's API may give for its metadata or file list.
    record_metadata_max_bytes: int = 32_000_000
    # Compile the repository's Python packages to bytecode while building. Costs build
    # time (about 5 s for numpy, scipy, pandas, matplotlib, seaborn on 2 cores) and saves
    # each session the compile on first import (about 2 s for the same stack). The Jupyter
    # server stack in the base image is always compiled.
    compile_bytecode: bool = False
    # --- the service (`binderbox serve`) ---
    # Where the web service listens.
    service_host: str = "127.0.0.1"
    service_port: int = 8585
    # The service's address as people reach it (e.g. https://binder.example.org/): links
    # on pages and in events, binder_launch_host and the launch events' origin start with
    # it. Unset: http://<service_host>:<service_port>/. Never taken from a request's Host.
    public_url: str = ""
    # Builds that may run at once; more wait in the queue with their position shown.
    build_concurrency: int = 2
    # Hosts (comma-separated, "host" or "host:port") that may be fetched from although
    # they are on a local or private network.
    allowed_hosts: str = ""
    # Seconds a resolved branch or tag is reused for further launches of the same link.
    ref_cache_seconds: int = 60
    # Check every host a repository or record is fetched from (the service turns this on:
    # anonymous users choose those URLs); allowed_hosts are the exceptions.
    check_remote_hosts: bool = False
    # Repositories' own Dockerfiles in service builds: "checked" builds those that pass
    # binderbox's checks (no downloads by dockerd, no secret, ssh or cache mounts, images
    # only from dockerfile_registries; README: "Dockerfiles on a public binderbox"),
    # "refused" builds none.
    repository_dockerfiles: str = "checked"
    # Registries (host or host:port, comma-separated) that images named by repositories'
    # Dockerfiles (FROM) may be pulled from in service builds; an image without a host
    # is Docker Hub's (docker.io).
    dockerfile_registries: str = (
        "docker.io,quay.io,ghcr.io,gcr.io,registry.gitlab.com,mcr.microsoft.com,public.ecr.aws"
    )
    # Whether /build accepts ?build_only=true (build, launch nothing).
    build_only_enabled: bool = False
    # Prebuilt images anyone may launch as they are (/v2/image/<name>): comma-separated
    # patterns of image names, '*' for any characters, such as "quay.io/jupyter/*,
    # registry.example.org/*"; empty: launching prebuilt images is off.
    prebuilt_images: str = ""
    # Sessions at once for one repository, and in all (0: as many as the machine's memory
    # holds at session_mem_guarantee each, keeping 2 GiB for everything else).
    per_repo_quota: int = 100
    total_quota: int = 0
    # /build requests per minute from one address (0: no limit). An address is an IPv4
    # address or an IPv6 /64.
    rate_limit_per_minute: int = 30
    # The launch page's build token: how long it is valid, how many of its /build
    # requests (the first and reconnects) skip the rate limit, and how many such requests
    # one address may make per minute (a class behind one address); beyond, they count.
    build_token_seconds: int = 600
    build_token_uses: int = 3
    page_rate_limit_per_minute: int = 120
    # Launches (open /build streams) and new builds one address may have under way at
    # once (0: no cap).
    launches_per_address: int = 10
    builds_per_address: int = 3
    # Builds that may wait for a slot; further ones are refused until the queue drains.
    build_queue_size: int = 50
    # Bytes of log kept and streamed per build (each line counts at least 100); the log
    # then says where it was cut and the build goes on. 0: no cap.
    build_log_max_bytes: int = 5_000_000
    # Threads for calls to the hosts users name (resolving a ref, record APIs) and the
    # seconds such a call may take before the launch fails; at most 4 x as many wait.
    blocking_threads: int = 16
    remote_timeout: int = 60
    # Reverse proxies (addresses or networks, comma-separated) whose Forwarded,
    # X-Forwarded-For and X-Real-IP headers name the client; no one else's count.
    trusted_proxies: str = ""
    # Comma-separated regular expressions of "<provider>/<spec>" that may not launch.
    banned_specs: str = ""
    # Comma-separated regular expressions: when set, only matching specs may launch.
    allowed_specs: str = ""
    # Comma-separated networks (CIDR) whose requests are refused.
    banned_networks: str = ""
    # Launch events, one JSON line each (mybinder.org archive shape); "" means
    # <state_dir>/launch-events.jsonl.
    launch_events_file: str = ""
    # Access-Control-Allow-Origin for the API and event stream ("" = no CORS header).
    cors_allow_origin: str = ""
    # Origin whose pages may call a session's Jupyter server from the browser (its
    # --ServerApp.allow_origin, e.g. a Jupyter Book using thebe); "" = same origin only.
    session_allow_origin: str = ""
    # An OCI registry that keeps the built images (builds push, sessions pull, "built" means
    # the registry has it), e.g. "http://127.0.0.1:5000"; empty keeps them in local Docker.
    registry_url: str = ""
    # The registry's address as session nodes reach it, when it differs from registry_url
    # (e.g. "172.18.0.1:5000" for a registry the manager knows as 127.0.0.1:5000).
    registry_pull_url: str = ""
    # Where sessions run: "local" (JupyterHub and DockerSpawner on this machine) or "swarm"
    # (a Docker Swarm this dockerd manages).
    backend: str = "local"
    # With backend = "swarm": the attachable overlay network the hub and proxy containers
    # sit on, and the Swarm placement constraints of sessions (comma-separated).
    swarm_network: str = "binderbox-swarm"
    swarm_constraints: str = "node.role==worker"
    # Pre-pulling (a node's first pull makes a launch slow): every swarm_prepull_every
    # seconds the swarm_prepull_top images with the most sessions running, and the images
    # named in swarm_prepull_images (comma-separated binderbox image names), are pulled
    # onto every node sessions may run on. 0 turns each off.
    swarm_prepull_top: int = 10
    swarm_prepull_every: int = 60
    swarm_prepull_images: str = ""
    # Build nodes: comma-separated Docker hosts ("tcp://10.0.0.5:2376") whose dockerd
    # builds (the least busy one that answers) and pushes to the registry; their API is
    # reached with the TLS client files in swarm_build_tls_dir (ca.pem, cert.pem, key.pem,
    # Docker's DOCKER_CERT_PATH layout). Empty: builds run on this machine.
    swarm_build_nodes: str = ""
    swarm_build_tls_dir: str = ""
    # The state database: empty keeps builds, logs and launches in SQLite in state_dir;
    # a postgresql:// URL puts them (and the hub's database) in PostgreSQL.
    database_url: str = ""
    # The disk budget (binderbox serve's cleaner, every cleaner_every seconds). Bytes the
    # images this binderbox built may hold beyond the base images they were built on
    # (20 GB: a few dozen typical repositories beside the base on a 50-100 GB disk); past
    # it the least recently launched go first, never one a session runs. 0: no budget.
    image_cache_max_bytes: int = 20_000_000_000
    # Bytes BuildKit's build cache (layers and the pip/uv cache mounts that make rebuilds
    # fast) may keep; pruned to it between builds. 0: no budget.
    build_cache_max_bytes: int = 10_000_000_000
    # Days build logs and launch records are kept (mybinder.org keeps logs 30 days); the
    # last successful build of an image still present keeps its log. 0: forever.
    log_retention_days: int = 30
    cleaner_every: int = 600
    # /usage names a repository only when it was launched successfully at least this often
    # in the days shown (fewer: it counts among "others"); a repository only its author
    # launches is not shown to everyone.
    usage_min_launches: int = 10
    # Parts that die come back (binderbox serve's supervisor): JupyterHub is started again
    # at once, unless it died restart_limit times within restart_window seconds; then
    # /health says so and the next try waits restart_window seconds (doubling each time).
    restart_limit: int = 5
    restart_window: int = 60
    # --- sessions (JupyterHub and configurable-http-proxy, all on 127.0.0.1) ---
    # Where the hub keeps its config, database, log and lock; the proxy's npm packages go
    # in <state_dir>/node.
    state_dir: str = dataclasses.field(default_factory=_default_state_dir)
    # The proxy's public port (sessions are at /user/<name>/), the hub's API port and the
    # proxy's API port.
    sessions_port: int = 8000
    # The address people reach the sessions' proxy at, when that is not
    # http://127.0.0.1:<sessions_port>/ (a public deployment behind a reverse proxy,
    # e.g. https://hub.example.org/): the session URLs handed out start with it.
    sessions_public_url: str = ""
    hub_port: int = 8081
    proxy_api_port: int = 8001
    # The configurable-http-proxy executable; empty: <state_dir>/node, then PATH.
    proxy_command: str = ""
    # Resources of each session container (bytes with K, M, G or T; CPUs; processes).
    session_mem_guarantee: str = "1G"
    session_mem_limit: str = "2G"
    session_cpu_limit: float = 1.0
    session_pids_limit: int = 1024
    # The Docker network sessions run on, created if missing with traffic between its
    # containers turned off: one session cannot reach another's server or kernels.
    session_network: str = "binderbox-sessions"
    # Firewall rules that keep sessions from this machine's services and the networks
    # below: "auto" sets them when binderbox runs as root (and says so when it cannot),
    # "required" refuses to start without them, "off" leaves sessions unguarded.
    session_firewall: str = "auto"
    # Networks sessions may not connect to (DNS to the host's resolvers still works):
    # private and link-local ranges by default, where cloud metadata and internal
    # services live.
    # The same rules for builds ("auto", "required", "off"): repositories' postBuild and
    # Dockerfile steps run on Docker's default bridge (docker0), so the rules apply to
    # every container on that bridge while binderbox serve runs.
    build_firewall: str = "auto"
    # Memory and processes all build steps may use together while serve runs (as root;
    # BuildKit ignores per-build limits). "0" / 0: no limit.
    build_memory_limit: str = "6G"
    build_pids_limit: int = 4096
    session_blocked_networks: str = (
        "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,169.254.0.0/16"
    )
    # Seconds a session may take from the spawn request until Jupyter answers.
    session_start_timeout: int = 120
    # Culling: seconds without traffic (0 never culls), maximum age in seconds (0: none),
    # and how often to check. Culled sessions' users are deleted too.
    cull_idle_timeout: int = 600
    cull_max_age: int = 21600
    cull_every: int = 60
    # mybinder.org's "up to one CPU-hour": a session whose container has used this many
    # seconds of CPU time is stopped (0: no budget), checked every session_cpu_check_every
    # seconds by binderbox serve (a session at one CPU may overshoot by that much).
    session_cpu_seconds_max: int = 3600
    session_cpu_check_every: int = 30
    # oom_score_adj of every kernel (1-1000), so a session over session_mem_limit loses a
    # kernel, which Jupyter restarts, rather than its server (0: kernels left as they are).
    session_kernel_oom_score_adj: int = 1000

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with the given non-None values replaced."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return _validated(dataclasses.replace(self, **changes))


def _convert(name: str, kind: type, raw: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(text)
        return kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"Setting '{name}' must be a {kind.__name__}, not {raw!r}.") from None


_URL_SETTINGS = (
    "doi_resolver",
    "zenodo_url",
    "zenodo_hosts",
    "figshare_url",
    "figshare_api_url",
    "figshare_hosts",
    "dataverse_hosts",
    "hydroshare_url",
    "ckan_hosts",
)


_IMAGE_PREFIX = re.compile(r"^[a-z0-9][a-z0-9._/-]*$")


def _validated(settings: Settings) -> Settings:
    if not _IMAGE_PREFIX.fullmatch(settings.image_prefix):
        raise UsageError(
            "Setting 'image_prefix' must be lowercase letters, digits, '.', '_', '-' or '/', "
            "such as 'binderbox-'."
        )
    if settings.python_fallback not in {"nearest", "fail"}:
        raise UsageError("Setting 'python_fallback' must be 'nearest' or 'fail'.")
    if settings.r_version_fallback not in {"nearest", "fail"}:
        raise UsageError("Setting 'r_version_fallback' must be 'nearest' or 'fail'.")
    if settings.cran_mirror and not r_support.check_mirror(settings.cran_mirror):
        raise UsageError(
            f"Setting 'cran_mirror' must be an http(s) URL without quotes, backslashes or "
            f"spaces, not {settings.cran_mirror!r}."
        )
    index_problem = package_index.check_index_url(settings.index_url)
    if index_problem:
        raise UsageError(index_problem)
    if settings.build_timeout <= 0:
        raise UsageError("Setting 'build_timeout' must be a positive number of seconds.")
    for name in ("image_cache_max_bytes", "build_cache_max_bytes", "log_retention_days"):
        if getattr(settings, name) < 0:
            raise UsageError(f"Setting '{name}' must be 0 (no limit) or a positive number.")
    if settings.cleaner_every <= 0:
        raise UsageError("Setting 'cleaner_every' must be a positive number of seconds.")
    if settings.usage_min_launches < 1:
        raise UsageError("Setting 'usage_min_launches' must be 1 or more.")
    for name in ("restart_limit", "restart_window"):
        if getattr(settings, name) <= 0:
            raise UsageError(f"Setting '{name}' must be a positive number.")
    for name in (
        "content_max_bytes",
        "content_max_files",
        "record_metadata_max_bytes",
        "git_max_bytes",
        "git_max_files",
        "git_timeout",
        "git_low_speed_seconds",
    ):
        if getattr(settings, name) <= 0:
            raise UsageError(f"Setting '{name}' must be a positive number.")
    for name in _URL_SETTINGS:
        for url in getattr(settings, name).replace(",", " ").split():
            if not url.startswith(("https://", "http://")):
                raise UsageError(f"Setting '{name}' must hold http(s) URLs, not {url!r}.")
    if settings.ca_bundle and not Path(settings.ca_bundle).is_file():
        raise UsageError(f"The CA bundle '{settings.ca_bundle}' does not exist.")
    _validate_registry(settings)
    _validate_prebuilt(settings)
    _validate_sessions(settings)
    _validate_abuse_limits(settings)
    return settings


def _validate_registry(settings: Settings) -> None:
    for name in ("registry_url", "registry_pull_url"):
        value = getattr(settings, name)
        if not value:
            continue
        # The pull address may be given as image references write it: host:port.
        parts = urlsplit(value if "://" in value or name == "registry_url" else "http://" + value)
        if (
            parts.scheme not in {"http", "https"}
            or not parts.hostname
            or parts.username is not None
            or parts.path not in {"", "/"}
            or parts.query
            or parts.fragment
        ):
            raise UsageError(
                f"Setting '{name}' must be a registry address such as "
                f"'http://127.0.0.1:5000' (no path or user name), not {value!r}."
            )
    if settings.registry_pull_url and not settings.registry_url:
        raise UsageError("Setting 'registry_pull_url' needs 'registry_url' beside it.")
    if settings.backend not in {"local", "swarm"}:
        raise UsageError("Setting 'backend' must be local or swarm.")
    _validate_build_nodes(settings)
    if settings.database_url and not settings.database_url.startswith(
        ("postgresql://", "postgres://")
    ):
        raise UsageError("Setting 'database_url' must be a postgresql:// URL, or empty for SQLite.")


def _validate_prebuilt(settings: Settings) -> None:
    from binderbox.providers.image import ImageRefused, parse_patterns

    try:
        parse_patterns(settings.prebuilt_images)
    except ImageRefused as error:
        raise UsageError(f"Setting 'prebuilt_images': {error.message}") from None


def build_nodes(settings: Settings) -> list[str]:
    return [part.strip() for part in settings.swarm_build_nodes.split(",") if part.strip()]


def _validate_build_nodes(settings: Settings) -> None:
    nodes = build_nodes(settings)
    if not nodes:
        return
    for node in nodes:
        parts = urlsplit(node)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port or parts.path:
            raise UsageError(
                "Setting 'swarm_build_nodes' must list Docker hosts such as "
                f"'tcp://10.0.0.5:2376', not {node!r}."
            )
    if not settings.registry_url:
        raise UsageError(
            "Setting 'swarm_build_nodes' needs 'registry_url': build nodes push the images "
            "they build there."
        )
    tls = Path(settings.swarm_build_tls_dir) if settings.swarm_build_tls_dir else None
    missing = [f for f in ("ca.pem", "cert.pem", "key.pem") if not tls or not (tls / f).is_file()]
    if missing:
        # A dockerd API open without client certificates makes its network root there.
        raise UsageError(
            "Setting 'swarm_build_tls_dir' must name a folder with ca.pem, cert.pem and key.pem "
            f"for the build nodes' TLS-protected dockerd ({', '.join(missing)} missing)."
        )


def _validate_abuse_limits(settings: Settings) -> None:
    for name in ("build_token_seconds", "blocking_threads", "remote_timeout"):
        if getattr(settings, name) <= 0:
            raise UsageError(f"Setting '{name}' must be a positive number.")
    for name in (
        "build_token_uses",
        "page_rate_limit_per_minute",
        "launches_per_address",
        "builds_per_address",
        "build_queue_size",
        "build_log_max_bytes",
    ):
        if getattr(settings, name) < 0:
            raise UsageError(f"Setting '{name}' must be 0 or a positive number.")
    for item in re.split(r"[,\s]+", settings.trusted_proxies.strip()):
        if item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise UsageError(
                    f"Setting 'trusted_proxies': '{item}' is not an address or network."
                ) from None


_BYTES = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGT]?)")


def size_in_bytes(text: str, name: str = "size") -> float:
    """``512M``, ``2G``, … in bytes (powers of 1024); UsageError naming the setting."""
    match = _BYTES.fullmatch(text)
    if not match:
        raise UsageError(f"Setting '{name}' must be a size such as 512M or 2G.")
    return float(match[1]) * 1024 ** "_KMGT".index(match[2] or "_")


def parse_networks(text: str) -> list[str]:
    """The IPv4 networks of a comma- or space-separated list; ValueError names a bad one."""
    networks = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"'{item}' is not a network such as 10.0.0.0/8") from None
        if network.version != 4:
            raise ValueError(f"'{item}' is IPv6; session networks are IPv4 only")
        networks.append(str(network))
    return networks


def _validate_sessions(settings: Settings) -> None:
    for name in ("sessions_port", "hub_port", "proxy_api_port"):
        if not 0 < getattr(settings, name) < 65536:
            raise UsageError(f"Setting '{name}' must be a port number (1 to 65535).")
    ports = {settings.sessions_port, settings.hub_port, settings.proxy_api_port}
    if len(ports) != 3:
        raise UsageError("Settings 'sessions_port', 'hub_port' and 'proxy_api_port' must differ.")
    amounts = {}
    for name in ("session_mem_guarantee", "session_mem_limit"):
        amounts[name] = size_in_bytes(getattr(settings, name), name)
    if amounts["session_mem_guarantee"] > amounts["session_mem_limit"]:
        raise UsageError("Setting 'session_mem_guarantee' must not exceed 'session_mem_limit'.")
    for name in (
        "session_cpu_limit",
        "session_pids_limit",
        "session_start_timeout",
        "cull_every",
        "session_cpu_check_every",
    ):
        if getattr(settings, name) <= 0:
            raise UsageError(f"Setting '{name}' must be a positive number.")
    for name in (
        "cull_idle_timeout",
        "cull_max_age",
        "swarm_prepull_top",
        "swarm_prepull_every",
        "session_cpu_seconds_max",
    ):
        if getattr(settings, name) < 0:
            raise UsageError(f"Setting '{name}' must be 0 (off) or a number of seconds.")
    if not 0 <= settings.session_kernel_oom_score_adj <= 1000:
        raise UsageError("Setting 'session_kernel_oom_score_adj' must be 0 (off) or 1 to 1000.")
    size_in_bytes(settings.build_memory_limit, "build_memory_limit")
    if settings.build_pids_limit < 0:
        raise UsageError("Setting 'build_pids_limit' must be 0 (no limit) or a number.")
    if settings.sessions_public_url and not re.fullmatch(
        r"https?://[^\s/?#]+(/[^\s?#]*)?", settings.sessions_public_url
    ):
        raise UsageError(
            "Setting 'sessions_public_url' must be an http(s) address such as "
            "https://hub.example.org/."
        )
    if settings.public_url and not re.fullmatch(
        r"https?://[^\s/?#@\"'<>]+(/[^\s?#\"'<>]*)?", settings.public_url
    ):
        raise UsageError(
            "Setting 'public_url' must be an http(s) address without a user name, such as "
            "https://binder.example.org/."
        )
    if settings.repository_dockerfiles not in {"checked", "refused"}:
        raise UsageError("Setting 'repository_dockerfiles' must be checked or refused.")
    for name in ("session_firewall", "build_firewall"):
        if getattr(settings, name) not in {"auto", "required", "off"}:
            raise UsageError(f"Setting '{name}' must be auto, required or off.")
    try:
        parse_networks(settings.session_blocked_networks)
    except ValueError as error:
        raise UsageError(f"Setting 'session_blocked_networks': {error}.") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", settings.session_network) or (
        settings.session_network in {"bridge", "host", "none", "default"}
    ):
        raise UsageError(
            "Setting 'session_network' must be the name of a Docker network of binderbox's "
            "own (letters, digits, '_', '.', '-'; not bridge, host or none)."
        )


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read settings from an optional TOML file and ``BINDERBOX_*`` variables."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or environ.get("BINDERBOX_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"The settings file '{path}' does not exist.") from None
        except OSError as err:
            raise UsageError(
                f"The settings file '{path}' cannot be read: {err.strerror}."
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"The settings file '{path}' is not valid TOML: {err}.") from None
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UsageError(f"The settings file '{path}' has an unknown setting '{key}'.")
            kind = hints[name]
            # TOML is typed: take a value only when it already has the right type.
            if (
                type(raw) is not kind
                and not (kind is int and type(raw) is float and raw.is_integer())
                and not (kind is float and type(raw) is int)
            ):
                raise UsageError(
                    f"The settings file '{path}': '{key}' must be a {kind.__name__}, not {raw!r}."
                )
            values[name] = kind(raw)

    for name in known:
        env_name = "BINDERBOX_" + name.upper()
        if env_name in environ:
            values[name] = _convert(name, hints[name], environ[env_name])

    return _validated(Settings(**values))
