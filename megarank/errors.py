"""Errors the library raises about its callers' arguments (torch-free)."""

from __future__ import annotations

from typing import Any


class ArgumentError(ValueError):
    """A bad argument of an API function, named as the function's parameter: ``dtype ('int8')
    must be one of bf16, fp16, fp32``. A command says its own flag instead (:meth:`as_flags`),
    so the library never speaks of command-line flags.

    ``template`` is a :meth:`str.format` string whose positional fields ``{0}``, ``{1}`` ... are
    the ``names`` of the parameters; ``values`` fill its named fields (given apart, so a value's
    own braces are never read as fields).
    """

    def __init__(self, template: str, *names: str, **values: Any) -> None:
        self.template, self.names, self.values = template, names, values
        super().__init__(template.format(*names, **values))

    def as_flags(self) -> str:
        """The message with each parameter named as its flag (``dtype`` -> ``--dtype``,
        ``max_shard_mb`` -> ``--max-shard-mb``)."""
        flags = ["--" + name.replace("_", "-") for name in self.names]
        return self.template.format(*flags, **self.values)


def for_command(error: Exception) -> str:
    """What a command prints for ``error``: an :class:`ArgumentError` with its parameters named
    as flags, any other error as it is."""
    return error.as_flags() if isinstance(error, ArgumentError) else str(error)
