#!/bin/sh
# Runs a deployment check with an external tool (promtool, docker-compose,
# yamllint), or skips (exit 77, ctest's SKIP_RETURN_CODE) when the tool is
# not installed: scripts/setup.sh installs all of them, so CI never skips.
#   check_tool.sh TOOL [ARGS...]
tool="$1"
if ! command -v "$tool" >/dev/null 2>&1; then
  echo "SKIP: $tool is not installed (bash scripts/setup.sh installs it)"
  exit 77
fi
exec "$@"
