"""Typed exceptions. Every error a user can cause is one of these, so the CLI can print a
one-line message instead of a traceback."""


class CSearchError(Exception):
    """Base class: the message is a complete one-line explanation for the user."""


class ImageError(CSearchError, ValueError):
    """An image could not be read or is not acceptable (missing, corrupt, too large, too small)."""


class CatalogueError(CSearchError, ValueError):
    """A catalogue SPEC is malformed, unknown or empty."""


class ConfigError(CSearchError, ValueError):
    """A config key or value is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A model, backend or option name is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class WeightsNotFound(CSearchError, FileNotFoundError):
    """A model's weights file is not available locally (and could not be downloaded)."""


class ModelMismatch(CSearchError, ValueError):
    """A model file has the wrong interface, or differs from the one an index was built with."""


class StoreError(CSearchError, RuntimeError):
    """An index directory is missing, incomplete or inconsistent."""


def unknown_name(kind: str, name: str, valid) -> UnknownNameError:
    """Build the error for an unknown name, listing valid names and the closest matches."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A third-party exception's message squeezed onto one line (for a CSearchError's text)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
