"""tests/unit is the fast tier: in-process tests only, about a minute in all (the in-process
tests that train or embed for seconds are in tests/integration). Starting a program here fails
(tests/helpers/inprocess.py)."""

from tests.helpers.inprocess import no_programs  # noqa: F401
