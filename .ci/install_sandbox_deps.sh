#!/usr/bin/env bash
# What the code verifier's kernel boundary (isolation="strict", alignkit/verifiers/sandbox_boundary.py)
# needs on a fresh machine: bubblewrap; setpriv (util-linux) and libseccomp2, which Debian/Ubuntu base
# images already have. Installs what is missing when run as root with apt-get; otherwise says what is
# missing, and the strict-level tests skip with the reason.
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
{ ldconfig -p 2>/dev/null || true; } | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "install_sandbox_deps: missing ${need[*]} (not root, or no apt-get): isolation='strict' tests will skip" >&2
  fi
fi
command -v bwrap >/dev/null 2>&1 && bwrap --version || true
