#!/usr/bin/env bash
# The server and CPU worker images' runtime stages, run without a Docker
# engine (README, "What was not built or run here"). A Debian 12 minbase root
# from debootstrap stands in for debian:12-slim. Each image gets its own copy
# with what its Dockerfile installs there: the packages its runtime stage
# names, those docker/runtime-packages.sh computes for its binaries, the
# binaries built here, and the uid 10001 user. Then, each process as uid
# 10001 inside its own root:
#   - no binary has an unresolved library;
#   - the server and two workers start, and /healthz answers in each;
#   - compressctl, from the server's root, submits a GPTQ job on the trained
#     model that the two workers split, and it ends SUCCEEDED.
# Needs root, chroot and Debian's package mirror (minutes of downloads the
# first time), so it is not part of CI.
#   bash scripts/image-rootfs-check.sh          (after scripts/build.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build="$repo/build"
work="$build/image-rootfs"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
port=50761
metrics_port=50762

if [ "$(id -u)" -ne 0 ]; then echo "image-rootfs-check: run as root (chroot)" >&2; exit 2; fi
command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
mkdir -p "$work/apt-archives/partial"
if [ ! -x "$work/base/usr/bin/apt-get" ]; then
  rm -rf "$work/base.tmp"
  debootstrap --variant=minbase bookworm "$work/base.tmp" "$mirror"
  mv "$work/base.tmp" "$work/base"
fi

mounts=()
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind SOURCE TARGET [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounts+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}

# The packages a Dockerfile's runtime stage names before its computed list.
dockerfile_packages() {
  awk '/^FROM debian:12-slim/ { runtime = 1 } runtime' "$1" | sed -e ':a' -e '/\\$/{N;s/\\\n//;ba}' |
    grep -o 'apt-get install -y --no-install-recommends [^$]*' |
    sed 's/apt-get install -y --no-install-recommends //'
}

# make_root NAME DOCKERFILE BINARY...: the image's root, installed.
make_root() {
  local name=$1 dockerfile=$2 root="$work/$1"
  shift 2
  local packages
  packages="$(dockerfile_packages "$dockerfile") $(sh "$repo/docker/runtime-packages.sh" "$@" | tr '\n' ' ')"
  echo "== $name: $packages"
  rm -rf "$root"
  cp -a "$work/base" "$root"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  bind "$work/apt-archives" "$root/var/cache/apt/archives"  # downloads kept between runs
  chroot "$root" apt-get update -q >/dev/null
  # shellcheck disable=SC2086
  chroot "$root" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends $packages >"$work/$name-apt.log"
  chroot "$root" useradd --system --uid 10001 --user-group --no-create-home \
    --shell /usr/sbin/nologin compress
  cp "$@" "$root/usr/local/bin/"
  bind /proc "$root/proc"
  bind /dev "$root/dev"
  for binary in "$@"; do
    if chroot "$root" ldd "/usr/local/bin/$(basename "$binary")" | grep 'not found'; then
      echo "FAIL: $name: $(basename "$binary") has unresolved libraries" >&2
      exit 1
    fi
  done
}

wait_healthy() {  # wait_healthy NAME PORT
  for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$2/healthz" >/dev/null 2>&1; then
      echo "== $1: /healthz answers"
      return 0
    fi
    sleep 0.2
  done
  echo "FAIL: $1: /healthz did not answer on $2" >&2
  exit 1
}

make_root server "$repo/docker/Dockerfile.server" \
  "$build/server/compress-server" "$build/client/compressctl"
make_root worker "$repo/docker/Dockerfile.worker-cpu" "$build/worker/compress-worker"

# The shared model folder, read-only at /models in both, as in the compose file.
models="$work/models"
rm -rf "$models" && mkdir -p "$models"
cp -r "$repo/tests/fixtures/kjv-llama" "$models/kjv-llama"
bash "$repo/scripts/kjv-text.sh" Matt1:1-Matt5:48 >"$models/matthew.txt"
bind "$models" "$work/server/models" ro
bind "$models" "$work/worker/models" ro
install -d -o 10001 -g 10001 "$work/server/data" "$work/worker/var/lib/compress-work"

as_compress() {  # as_compress ROOT COMMAND...
  local root=$1
  shift
  chroot --userspec=10001:10001 "$root" env HOME=/tmp "$@"
}
start_as_compress() {  # start_as_compress LOG ROOT COMMAND...: in the background
  local log=$1 root=$2
  shift 2
  chroot --userspec=10001:10001 "$root" env HOME=/tmp "$@" >"$log" 2>&1 &
  pids+=($!)
}
for p in "$port" "$metrics_port" "$((metrics_port + 1))" "$((metrics_port + 2))"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "image-rootfs-check: port $p is in use" >&2
    exit 1
  fi
done
start_as_compress "$work/server.log" "$work/server" compress-server --listen "127.0.0.1:$port" \
  --metrics-listen "127.0.0.1:$metrics_port" --data-dir /data --model-root /models
wait_healthy server "$metrics_port"
for i in 1 2; do
  start_as_compress "$work/worker-$i.log" "$work/worker" compress-worker \
    --server "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((metrics_port + i))" \
    --work-dir "/var/lib/compress-work/$i" --device cpu --worker-id "rootfs-$i"
  wait_healthy "worker $i" "$((metrics_port + i))"
done

cat >"$work/server/tmp/recipe.yaml" <<'EOF'
model: {path: kjv-llama}
calibration: {path: matthew.txt, num_samples: 16, sequence_length: 64, propagation: PROPAGATION_PARALLEL}
stages: [{gptq: {bits: 4, group_size: 64}}]
outputs: [packed_safetensors, gguf]
gguf: [{preset: Q4_K_M}]
EOF
as_compress "$work/server" compressctl --server "127.0.0.1:$port" submit \
  --recipe /tmp/recipe.yaml --watch | tee "$work/submit.out"
job=$(grep -o 'job-[0-9a-f]*' "$work/submit.out" | head -1)
as_compress "$work/server" compressctl --server "127.0.0.1:$port" get "$job" | tee "$work/get.out"
grep -q 'State: *SUCCEEDED' "$work/get.out" || { echo "FAIL: $job did not succeed" >&2; exit 1; }
for i in 1 2; do
  grep -q "finished on rootfs-$i" "$work/submit.out" || { echo "FAIL: worker $i ran no task" >&2; exit 1; }
done
echo "PASS: the server and CPU worker runtime roots start as uid 10001, answer /healthz, and run $job"
