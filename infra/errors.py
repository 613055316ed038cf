"""The one error type for bad input: it always names where the bad value came from."""

from __future__ import annotations


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
