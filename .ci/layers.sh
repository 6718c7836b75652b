#!/usr/bin/env bash
# Fails when a module of the server crate imports from a layer above it.
# Layers, top to bottom (see server/src/lib.rs, "# Layout"):
#   http (4) -> service (3) -> cluster (2) -> persist (1) -> shared (0)
# Shared modules (error, wire, config, load, telemetry) import only each
# other. boot.rs, main.rs and replay/ sit on top and may import anything.
set -euo pipefail
cd "$(dirname "$0")/../server/src"

rank() {
  case "$1" in
    http) echo 4 ;;
    service) echo 3 ;;
    cluster) echo 2 ;;
    persist) echo 1 ;;
    error | wire | config | load | telemetry) echo 0 ;;
    *) echo top ;;
  esac
}

bad=0
checked=0
for file in $(find . -name '*.rs' | sort); do
  path=${file#./}
  module=${path%%/*}
  module=${module%.rs}
  own=$(rank "$module")
  [ "$own" = top ] && continue
  checked=$((checked + 1))
  # Every `crate::x` path outside comments, with its line number.
  while IFS=: read -r line used; do
    target=$(rank "$used")
    if [ "$target" = top ] || [ "$target" -gt "$own" ]; then
      echo "server/src/$path:$line: $module (layer $own) imports crate::$used (layer $target)" >&2
      bad=$((bad + 1))
    fi
  done < <(grep -n 'crate::' "$file" \
    | grep -v '^[0-9]*:\s*//' \
    | sed -E 's/\/\/.*$//' \
    | grep -oE '^[0-9]+:|crate::[a-z_]+' \
    | awk '/^[0-9]+:$/ { n = substr($0, 1, length($0) - 1); next } { sub("crate::", ""); print n ":" $0 }')
  # `use crate::{a, b}` groups.
  while IFS=: read -r line group; do
    for used in $(echo "$group" | grep -oE '(^|[{,]\s*)[a-z_]+' | grep -oE '[a-z_]+'); do
      target=$(rank "$used")
      if [ "$target" = top ] || [ "$target" -gt "$own" ]; then
        echo "server/src/$path:$line: $module (layer $own) imports crate::$used (layer $target)" >&2
        bad=$((bad + 1))
      fi
    done
  done < <(grep -nE '^\s*(pub(\([a-z]+\))? )?use crate::\{' "$file" | sed -E 's/use crate::\{//')
done

if [ "$bad" -gt 0 ]; then
  echo "layers: $bad import(s) reach up a layer" >&2
  exit 1
fi
echo "layers: $checked files import only their own layer or below"
