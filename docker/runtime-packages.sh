#!/bin/sh
# Prints the Debian/Ubuntu packages that own the shared libraries the given
# binaries link against directly (one per line, sorted), so that an image's
# runtime stage installs what its build stage linked and apt brings the rest.
# Libraries no package owns (LibTorch unpacked under /opt) are left out: the
# image copies those itself.
#   docker/runtime-packages.sh build/server/compress-server > packages.txt
set -eu
for binary in "$@"; do
  # NEEDED names, resolved to the paths the loader picks.
  needed=$(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  for name in $needed; do
    ldd "$binary" | awk -v name="$name" '$1 == name && $3 ~ /^\// { print $3 }'
  done
done | sort -u | while read -r library; do
  # dpkg -S knows the path the package installed (/usr/lib/...), which on a
  # merged-/usr system may differ from the one the loader found (/lib/...).
  real=$(readlink -f "$library")
  for path in "$library" "$real" "/usr$library" "/usr$real"; do
    owner=$(dpkg -S "$path" 2>/dev/null | head -n 1 | cut -d: -f1) || true
    if [ -n "$owner" ]; then
      echo "$owner"
      break
    fi
  done
done | sort -u
