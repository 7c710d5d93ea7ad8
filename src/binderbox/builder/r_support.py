"""R support (pure): runtime.txt's ``r-`` forms, DESCRIPTION, and the R parts of an image.

R comes from Debian packages (``r-base-core`` and ``r-cran-irkernel``), one R version per
Debian suite. Packages a repository installs with ``install.R`` or through its
DESCRIPTION come from a CRAN mirror: the dated snapshot runtime.txt names, or the
``cran_mirror`` setting. The mirror is also written to the image's ``Rprofile.site`` so
``install.packages()`` works the same way at runtime.
"""

from __future__ import annotations

import datetime
import re
import shlex

from binderbox.builder import stack
from binderbox.builder.plan import AptPackage, RSetup
from binderbox.errors import ConfigError, quoted

# A plain CRAN mirror (no date), and Posit Package Manager's dated CRAN snapshots, which
# start on 2017-10-10.
CRAN_DEFAULT = "https://cloud.r-project.org"
CRAN_SNAPSHOT = "https://packagemanager.posit.co/cran/{date}"
EARLIEST_SNAPSHOT = "2017-10-10"

# Debian packages for R and its Jupyter kernel; compilers and headers only when needed.
R_PACKAGES = ("r-base-core", "r-cran-irkernel")
R_BUILD_PACKAGES = ("r-base-dev",)
# Writable by the user, first in R's library path (Debian's R_LIBS_SITE), so packages go
# there both at build time and when the user calls install.packages() at runtime.
SITE_LIBRARY = "/usr/local/lib/R/site-library"
RPROFILE = "/etc/R/Rprofile.site"
# The same apt caches as apt.txt's step.
APT_CACHE_MOUNTS = (
    "type=cache,id=binderbox-apt-cache,target=/var/cache/apt,sharing=locked",
    "type=cache,id=binderbox-apt-lists,target=/var/lib/apt/lists,sharing=locked",
)
# The helper scripts, bind-mounted from the build context (never left in the image).
RUNNER = "r-run.R"
DESCRIPTION_INSTALLER = "r-install-description.R"
HELPERS_IN_IMAGE = "/tmp/binderbox-r"

# Packages that come with R itself: dependencies on them need nothing installed.
BASE_PACKAGES = frozenset(
    {
        "R",
        "base",
        "compiler",
        "datasets",
        "graphics",
        "grDevices",
        "grid",
        "methods",
        "parallel",
        "splines",
        "stats",
        "stats4",
        "tcltk",
        "tools",
        "utils",
    }
)

_DATE = r"\d{4}-\d{2}-\d{2}"
_RUNTIME_R = re.compile(
    rf"r-(?:(?P<version>\d+\.\d+(?:\.\d+)?)(?:-(?P<date>{_DATE}))?|(?P<date_only>{_DATE}))"
)
# A mirror URL goes into a shell command and an R string: http(s), and none of the
# characters that could end either (quotes, backslashes, backticks, whitespace).
_MIRROR_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d+)?(?:/[A-Za-z0-9._~!$&()*+,;=:@%/-]*)?")
# install.R lines that only load or report, never install: such a script needs no compilers.
# One call per line; anything else (or any mention of "install") counts as installing.
_LOADS_ONLY = re.compile(
    r"(library|require|requireNamespace|suppressPackageStartupMessages|suppressMessages"
    r"|stopifnot|message|cat|print|options|invisible)\s*\([^;]*\)\s*;?\s*(#.*)?"
)


def parse_runtime(line: str, rel: str) -> tuple[str, str]:
    """``(version, date)`` from an ``r-…`` runtime.txt line; either may be ""."""
    match = _RUNTIME_R.fullmatch(line)
    if not match:
        raise ConfigError(
            f"{rel}: {quoted(line)} is not understood; write r-X.Y-YYYY-MM-DD, r-YYYY-MM-DD "
            "or r-X.Y, for example r-4.2-2023-01-01."
        )
    date = match["date"] or match["date_only"] or ""
    if date:
        try:
            datetime.date.fromisoformat(date)
        except ValueError:
            raise ConfigError(
                f"{rel}: {quoted(date)} in {quoted(line)} is not a valid date."
            ) from None
    return match["version"] or "", date


def install_script_compiles(text: str) -> bool:
    """Whether an install.R may build packages from source (anything but loading them)."""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if "install" in line.lower() or not _LOADS_ONLY.fullmatch(line):
            return True
    return False


def read_description(text: str, rel: str) -> tuple[str, tuple[str, ...]]:
    """The package name and the packages it needs (Depends, Imports, LinkingTo) from a
    DESCRIPTION file, leaving out R itself and the packages that come with it."""
    parts: dict[str, list[str]] = {}  # lists: joining once stays linear in the file's size
    name = ""
    for raw in text.splitlines():
        if raw[:1] in (" ", "\t") and name:
            parts[name].append(raw.strip())
        elif ":" in raw:
            name, _, value = raw.partition(":")
            name = name.strip()
            parts[name] = [value.strip()]
    fields = {key: " ".join(values) for key, values in parts.items()}
    package = fields.get("Package", "")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9.]*", package):
        raise ConfigError(
            f"{rel}: it has no valid 'Package:' field, so the repository cannot be installed "
            "as an R package."
        )
    needs: list[str] = []
    for field in ("Depends", "Imports", "LinkingTo"):
        for item in fields.get(field, "").split(","):
            dep = item.split("(")[0].strip()
            if dep and dep not in BASE_PACKAGES and dep not in needs:
                needs.append(dep)
    return package, tuple(needs)


def from_debian(dependencies: tuple[str, ...], apt: tuple[AptPackage, ...]) -> bool:
    """Whether apt.txt's ``r-cran-*`` packages provide every one of these R packages."""
    provided = {p.name.removeprefix("r-cran-") for p in apt if p.name.startswith("r-cran-")}
    return all(dep.lower() in provided for dep in dependencies)


def check_mirror(url: str) -> bool:
    return bool(_MIRROR_URL.fullmatch(url))


def cran_mirror(r: RSetup, configured: str) -> str:
    """The CRAN mirror of an image: the setting, else runtime.txt's snapshot, else CRAN."""
    if configured:
        return configured.rstrip("/")
    if r.snapshot:
        return CRAN_SNAPSHOT.format(date=max(r.snapshot, EARLIEST_SNAPSHOT))
    return CRAN_DEFAULT


def system_packages(r: RSetup) -> tuple[str, ...]:
    return R_PACKAGES + (R_BUILD_PACKAGES if r.compilers else ())


def install_command(r: RSetup) -> str:
    """Root: R from Debian. Worded unlike apt.txt's step, whose log marker must differ."""
    return "apt-get update -qq && apt-get install --no-install-recommends -y " + " ".join(
        system_packages(r)
    )


def configure_command(mirror: str, uid: int) -> str:
    """Root: the CRAN mirror in Rprofile.site, and the site library given to the user."""
    lines = (
        "# binderbox: the CRAN mirror of install.packages() (runtime.txt date or cran_mirror)",
        f'options(repos = c(CRAN = "{mirror}"))',
    )
    return (
        f"printf '%s\\n' {' '.join(shlex.quote(line) for line in lines)} >> {RPROFILE}"
        f" && install -d -m 0755 -o {uid} -g {uid} {SITE_LIBRARY}"
    )


def kernelspec_command() -> str:
    """User: register the IRkernel as 'ir' in the image's Jupyter (the venv)."""
    code = f'quit(status = IRkernel::installspec(user = FALSE, prefix = "{stack.VENV}"))'
    return f"R --quiet --no-save -e {shlex.quote(code)}"


def helper_mount(name: str, support_dir: str) -> str:
    return f"type=bind,source={support_dir}/{name},target={HELPERS_IN_IMAGE}/{name}"


def run_script_command(label: str, script: str) -> str:
    """User, in the repository: run an R script through the runner (failures are fatal)."""
    runner = f"{HELPERS_IN_IMAGE}/{RUNNER}"
    return f"Rscript {runner} {shlex.quote(label)} {shlex.quote(script)}"


# Runs an R script so that a package that cannot be installed fails the build: R itself
# only warns, and the build would go on without it.
RUNNER_SCRIPT = r"""# binderbox: run an R script; a package that cannot be installed ends the build.
local({
  args <- commandArgs(trailingOnly = TRUE)
  label <- args[[1]]
  unreachable <- character()
  fail <- function(text) {
    message("binderbox: ", label, ": ", text)
    quit(save = "no", status = 1)
  }
  on_warning <- function(w) {
    text <- conditionMessage(w)
    first <- sub("\n.*", "", text)
    if (grepl("unable to access index for repository", first, fixed = TRUE)) {
      repo <- sub(".*repository (\\S+?)(/src/contrib)?:?$", "\\1", first, perl = TRUE)
      unreachable <<- union(unreachable, repo)
    } else if (grepl("is not available|had non-zero exit status|download of package", first)) {
      if (length(unreachable)) {
        first <- paste0(first, " (could not reach ", paste(unreachable, collapse = ", "), ")")
      }
      fail(first)
    }
  }
  options(Ncpus = max(1L, parallel::detectCores(), na.rm = TRUE))
  withCallingHandlers(
    tryCatch(
      source(args[[2]], echo = TRUE, max.deparse.length = Inf),
      error = function(e) fail(conditionMessage(e))
    ),
    warning = on_warning
  )
})
"""

# Installs the repository as an R package: first the dependencies its DESCRIPTION names
# that are not installed yet (from the CRAN mirror), then the package, built the way
# `R CMD build` does (which also adds a NAMESPACE exporting everything when there is none).
DESCRIPTION_SCRIPT = r"""# binderbox: install the repository as an R package.
local({
  desc <- read.dcf("DESCRIPTION")
  fields <- intersect(c("Depends", "Imports", "LinkingTo"), colnames(desc))
  deps <- unlist(lapply(fields, function(f) strsplit(desc[1, f], ",")[[1]]))
  deps <- trimws(sub("\\(.*", "", deps))
  deps <- setdiff(deps[nzchar(deps)], c("R", rownames(installed.packages())))
  if (length(deps)) install.packages(deps)
  repo <- getwd()
  out <- tempfile("binderbox-r-build-")
  dir.create(out)
  setwd(out)
  status <- system2(file.path(R.home("bin"), "R"),
                    c("CMD", "build", "--no-build-vignettes", "--no-manual", shQuote(repo)))
  if (status != 0) stop("R CMD build failed (see above)")
  install.packages(list.files(out, "[.]tar[.]gz$", full.names = TRUE), repos = NULL,
                   type = "source")
  setwd(repo)
  unlink(out, recursive = TRUE)
})
"""
