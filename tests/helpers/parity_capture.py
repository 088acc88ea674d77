"""A command with what it prints kept, for cases of :mod:`tests.helpers.cases` whose output the
test reads.

    cli_case("tests.helpers.parity_capture", [OUT, MODULE, *ARGS])

runs ``MODULE.main(ARGS)`` with this rank's stdout written to ``OUT.rank<RANK>`` (also when it
fails); :func:`read_stdout` joins every rank's, as a torchrun launch's stdout would hold them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path


def read_stdout(out: str | Path, nproc: int) -> str:
    """Every rank's captured stdout, in rank order."""
    return "".join(Path(f"{out}.rank{r}").read_text() for r in range(nproc))


def main(argv: list[str] | None = None) -> None:
    out, module, *args = sys.argv[1:] if argv is None else argv
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            importlib.import_module(module).main(args)
    finally:
        Path(f"{out}.rank{os.environ.get('RANK', '0')}").write_text(buffer.getvalue())


if __name__ == "__main__":
    main()
