"""``megarank <command> [hydra overrides]``: one entry point for the project's commands.

``megarank train model=bert_tiny task=pairwise`` is ``python -m megarank.train ...``; for several
processes use ``torchrun --nproc_per_node N -m megarank.train ...`` (or ``launch/train.sh``).
"""

from __future__ import annotations

import gc
import sys

COMMANDS = {
    "train": "megarank.train",
    "convert": "megarank.convert",
    "score": "megarank.score",
    "evaluate": "megarank.evaluate",
    "mine": "megarank.mine",
    "prepare": "megarank.prepare",
    "plan": "megarank.plan",
    "serve": "megarank.serve",
    "compare": "megarank.compare",
    "quickstart": "megarank.quickstart",
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a command module's ``main``, passing the remaining arguments through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: megarank {{{','.join(COMMANDS)}}} [args...]", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]])
    if COMMANDS[argv[0]] == "megarank.train":  # Hydra's entry point reads sys.argv
        sys.argv = [f"megarank {argv[0]}", *argv[1:]]
        module.main()
    else:
        module.main(argv[1:])


def freeze_for_exit() -> None:
    """The process exits next: move every object the cyclic garbage collector tracks to its
    permanent generation, so that the interpreter's collections at shutdown skip them. After a
    run, half a million objects (torch, megatron, transformers, Hydra) make those collections
    take 2.5 s of a rank's exit (MiniLM, 2 ranks, this machine); the exit returns the memory
    either way. Process entry points only: a library caller keeps its collector as it was."""
    gc.freeze()


def console() -> None:
    """The ``megarank`` console script: :func:`main`, then :func:`freeze_for_exit`."""
    main()
    freeze_for_exit()
