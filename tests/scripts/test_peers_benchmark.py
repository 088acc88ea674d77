"""The peer throughput benchmark must run as it is when someone next measures with it.

``benchmarks/peers.py --smoke`` runs every system (the plain HF loop, the packed HF reference,
megarank, megarank with packing where it exists) on tiny models on the CPU, both geometries, in
two processes (the Hugging Face systems, megarank's) that it starts as it starts one a system
in a real run, and prints one table a geometry. The packed reference must score exactly what
the padded HF model scores on the same pairs, and pad less.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO

# The benchmarks' smoke runs: minutes together, so the full suite's, not the loop's.
pytestmark = pytest.mark.slow

ALWAYS = ("hf-bf16", "hf-autocast", "packed-ref", "packed-ref-1mb", "megarank")
PACKED = ("megarank-packed", "megarank-packed-1mb")


def _tables(stdout: str) -> list[dict[str, dict[str, str]]]:
    """Each markdown table as {system: {column: cell}}."""
    tables, header = [], None
    for line in stdout.splitlines():
        if line.startswith("| system |"):
            header = [c.strip() for c in line.strip("|").split("|")]
            tables.append({})
        elif header and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[-1][cells[0]] = dict(zip(header, cells, strict=True))
        elif not line.startswith("|"):
            header = None
    return tables


def test_peers_benchmark_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/peers.py", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    tables = _tables(proc.stdout)
    assert len(tables) == 2, proc.stdout  # decoder, encoder
    for rows in tables:
        assert list(rows) == [*ALWAYS, *PACKED], rows
        for system, row in rows.items():
            if system in PACKED and row["pairs/s"].startswith("not available"):
                continue  # megarank without packing
            pairs = float(row["pairs/s"])
            assert math.isfinite(pairs) and pairs > 0, (system, row)
            assert int(row["syncs/step"]) >= 0 and int(row["shapes"]) >= 1
            assert int(row["ops/micro-batch"]) > 0
        hf, ref = rows["hf-bf16"], rows["packed-ref"]
        assert float(ref["padded tok/step"]) < float(hf["padded tok/step"])
        assert float(ref["pad %"].rstrip("%")) < float(hf["pad %"].rstrip("%"))
        assert float(rows["packed-ref-1mb"]["padded tok/step"]) == float(ref["padded tok/step"])
    parity = [float(x) for x in
              re.findall(r"packed-ref parity max \|d\| = (\S+)", proc.stdout)]
    assert len(parity) == 4, proc.stdout  # packed-ref and packed-ref-1mb, both geometries
    assert all(d < 1e-5 for d in parity), parity
    # The speed targets read off each table: on the CPU, the proxies.
    checks = re.findall(r"^\| (host syncs a step|operators a micro-batch against hf-bf16) \| "
                        r"(\S+) \| [^|]+ \| [^|]+ \| (\S+) \|$", proc.stdout, re.M)
    assert len(checks) == 4, proc.stdout  # two targets, both geometries
    assert all(met == "yes" for what, _, met in checks if what == "host syncs a step"), checks
