#!/bin/sh
# ctest's entry to validate.mjs; skips (77) where scripts/setup.sh has not
# installed Node.js and the schema packages, so CI never skips.
#   run.sh NODE_MODULES MANIFEST_DIR WORK_DIR
if ! command -v node >/dev/null 2>&1 || [ ! -d "$1/kubernetes-models" ]; then
  echo "SKIP: no node, or no schema packages in $1 (bash scripts/setup.sh installs them)"
  exit 77
fi
exec node "$(dirname "$0")/validate.mjs" "$@"
