#!/usr/bin/env bash
# Entry point for the peer job-queue benchmark (see README.md).
# Installs the pinned dependencies on first use, then runs run.mjs with the
# given arguments. Only the final JSON result goes to stdout.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules ]; then
  echo "[peers] installing dependencies (npm ci)" >&2
  npm ci --no-audit --no-fund >&2
fi
exec node run.mjs "$@"
