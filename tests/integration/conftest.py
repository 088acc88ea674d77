"""tests/integration: in-process tests that train, embed or convert for seconds each (training
runs of each loss, LoRA and QLoRA, prepared data, MaxP, dense mining), kept out of the fast tier.
Starting a program here fails, as in tests/unit (tests/helpers/inprocess.py)."""

from tests.helpers.inprocess import no_programs  # noqa: F401
