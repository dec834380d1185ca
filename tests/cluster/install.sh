#!/usr/bin/env bash
# Install what the cluster tests run for real: a single-node Slurm (slurm-wlm, munge) and a
# headless Chromium for the MLflow UI check. Debian/Ubuntu, as root; does nothing for
# packages that are already there. Called by .ci/run before `make test`.
set -euo pipefail
PACKAGES=(slurm-wlm munge chromium)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "tests/cluster/install.sh: not root or no apt-get; cannot install ${missing[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
