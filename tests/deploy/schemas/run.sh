#!/bin/sh
# ctest's entry to the schema checks here; skips (77) where scripts/setup.sh
# has not installed Node.js and the schema packages, so CI never skips.
#   run.sh CHECK NODE_MODULES DIR WORK_DIR    (CHECK: kubernetes or grafana)
check="$1"
shift
if ! command -v node >/dev/null 2>&1 || [ ! -d "$1/typescript" ]; then
  echo "SKIP: no node, or no schema packages in $1 (bash scripts/setup.sh installs them)"
  exit 77
fi
exec node "$(dirname "$0")/$check.mjs" "$@"
