"""Copy a directory as it is now, for checks on it after later cases of a launch change it.

    cli_case("tests.helpers.dist_train_snapshot", [SRC, DST])

A run stopped at step N and then resumed in the same launch rewrites its ``checkpoints/latest``
and may drop old checkpoints; a copy taken between the two cases keeps what the stopped run left.
Rank 0 copies; the other ranks go on to the next case, whose process group waits for rank 0.
"""

from __future__ import annotations

import os
import shutil
import sys


def main(argv: list[str] | None = None) -> None:
    src, dst = argv if argv is not None else sys.argv[1:3]
    if int(os.environ.get("RANK", 0)) == 0:
        shutil.copytree(src, dst)


if __name__ == "__main__":
    main()
