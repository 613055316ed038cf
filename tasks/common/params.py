"""A system's run parameters: what ``--config`` may set and its flow takes, checked once, at the boundary.

Each system subclasses :class:`RunParams`: its fields with their checks (pydantic), the fields that
name files (resolved against the config file's folder) and :meth:`RunParams.load_inputs`, which reads
those files, so that bad input is refused — naming the file, the field and the value — before a
server or a cluster starts, and inner code gets loaded specs instead of paths to parse again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from infra.errors import InputError, field_path, load_yaml, value_at


class RunParams(BaseModel):
    """Base of every system's parameters model."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    SYSTEM: ClassVar[str] = "system"
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()  # fields holding file paths
    _infra: object = PrivateAttr(None)

    @property
    def infra_spec(self):
        """The run's infrastructure spec (:class:`infra.spec.InfraSpec`), once :meth:`load_inputs` read it."""
        return self._infra

    @classmethod
    def keys(cls) -> list[str]:
        """What a run config may set."""
        return list(cls.model_fields)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], scale: str | None = None) -> Self:
        """Read a run config (YAML mapping of parameters); relative paths are taken from its folder."""
        path = Path(path)
        data = load_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InputError(path, "<file>", type(data).__name__,
                             f"expected a mapping of run parameters ({', '.join(cls.keys())})")
        for key in cls.PATH_FIELDS:
            if isinstance(data.get(key), str):
                data[key] = str((path.parent / data[key]).resolve())
        return cls.parse(data, source=path, scale=scale)

    @classmethod
    def parse(cls, data: dict, source: object, scale: str | None = None) -> Self:
        """Check ``data`` (field by field, then the files it names, for a run of ``scale``); the first
        problem is an :class:`InputError` naming ``source``, the field and its value."""
        params = cls.check_fields(data, source)
        params.load_inputs(source, scale)
        return params

    @classmethod
    def check_fields(cls, data: dict, source: object) -> Self:
        """Check the fields given (the others keep their defaults), without reading any file."""
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise InputError(source, unknown[0], data[unknown[0]],
                             f"unknown; a {cls.SYSTEM} run takes {', '.join(cls.keys())}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            loc = tuple(error["loc"])
            reason = error["msg"].removeprefix("Value error, ")
            raise InputError(source, field_path(loc) or "<root>", value_at(data, loc), reason) from None

    def load_inputs(self, source: object, scale: str | None = None) -> None:
        """Read and check the files the parameters name, keeping what they hold for the run
        (systems with file inputs override it; a private attribute holds each)."""

    def flow_kwargs(self) -> dict:
        """The parameters as the system's flow takes them."""
        return {name: getattr(self, name) for name in type(self).model_fields}
