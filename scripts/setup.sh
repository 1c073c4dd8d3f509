#!/usr/bin/env bash
# Installs every Debian 12 package the build, the demo and the tests need.
# Safe to run twice: apt-get skips what is already installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  build-essential cmake ninja-build ccache pkg-config git ca-certificates \
  protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev libgrpc-dev \
  libabsl-dev libre2-dev libicu-dev libssl-dev zlib1g-dev libc-ares-dev \
  libtorch-dev libopenblas0-pthread libopenblas-dev \
  libsqlite3-dev libpq-dev postgresql libgtest-dev libgmock-dev \
  libcpp-httplib-dev nlohmann-json3-dev libyaml-cpp-dev \
  clang libclang-rt-14-dev llvm-14 \
  bible-kjv prometheus openssl python3 curl jq \
  docker-compose yamllint

# The API schemas the deploy_*_schema tests check deploy/ against (Kubernetes,
# the Prometheus Operator, Grafana dashboards), pinned by the lock file, from
# the npm registry (Debian packages no such validator).
if ! command -v npm >/dev/null 2>&1; then
  $SUDO apt-get install -y -q --no-install-recommends nodejs npm
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
schema_dir="$root/build/deploy-schemas"
mkdir -p "$schema_dir"
cp "$root/tests/deploy/schemas/package.json" "$root/tests/deploy/schemas/package-lock.json" \
   "$schema_dir/"
(cd "$schema_dir" && npm ci --no-audit --no-fund --loglevel=error)
