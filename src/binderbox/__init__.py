"""binderbox: turn a code repository into a live, shareable Jupyter environment."""

__version__ = "0.1.0"
