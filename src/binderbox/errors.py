"""Errors a user can see: each carries one sentence written for them."""


class BinderboxError(Exception):
    """Base for every error shown to a user as a plain message, never a traceback."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail


class ConfigError(BinderboxError):
    """A repository's configuration files cannot be used as written."""


class SourceError(BinderboxError):
    """The repository could not be found or fetched."""


class DockerUnavailable(BinderboxError):
    """The Docker daemon cannot be reached."""


class BuildFailed(BinderboxError):
    """The image build ran and failed."""


class BaseImageUnavailable(BuildFailed):
    """A FROM image could not be pulled from its registry."""


class UsageError(BinderboxError):
    """A command-line argument or option is invalid."""
