"""The one error type for bad input: it always names where the bad value came from."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class InputError(ValueError):
    """Bad user input, reported before any work starts.

    Parameters
    ----------
    source: the file (or other origin) the value was read from.
    field: the field, column or key that holds the value.
    value: the offending value as read.
    reason: what is wrong with it, in words a user can act on.
    """

    def __init__(self, source: object, field: str, value: object, reason: str):
        self.source, self.field, self.value, self.reason = str(source), field, value, reason
        super().__init__(f"{self.source}: field {field!r} = {value!r}: {reason}")

    def __reduce__(self):  # survive pickling between Dask workers
        return (type(self), (self.source, self.field, self.value, self.reason))


def load_yaml(path: "str | os.PathLike[str]") -> object:
    """Parse a YAML file; a missing file or malformed YAML is an InputError naming the line."""
    import yaml

    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise InputError(path, "<file>", str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "<file>", str(path), f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        column = f", column {mark.column + 1}" if mark else ""
        raise InputError(path, where, what, f"malformed YAML{column}") from None


def field_path(loc: tuple) -> str:
    """A pydantic error location as a field path: ``pools[1].device``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def value_at(data: object, loc: tuple) -> object:
    """The raw value at a pydantic error location (None when it is missing)."""
    for part in loc:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def from_validation_error(source: object, exc: "ValidationError", data: object, loc: tuple | None = None) -> InputError:
    """The first problem pydantic found, as an InputError naming file, field and value."""
    err = exc.errors()[0]
    loc = tuple(err["loc"]) if loc is None else loc
    return InputError(source, field_path(loc) or "<root>", value_at(data, loc), err["msg"])
