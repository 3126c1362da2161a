#!/bin/sh
# Make the *.env files that kustomization.yaml reads from the *.env.example templates:
# every CHANGE_ME_<NAME> placeholder becomes one random URL-safe value (48 hex chars),
# the same value everywhere it appears (so PSAMF_OPTUNA_STORAGE matches POSTGRES_PASSWORD).
# Existing *.env files are kept; delete one to regenerate it. Nothing is printed.
#   usage: init-env.sh [DIR]     (default: the directory of this script)
set -eu
dir=${1:-$(dirname "$0")}
umask 077
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# One value per placeholder name, across all templates; longest names first, so no name
# is replaced inside a longer one.
for name in $(cat "$dir"/*.env.example | grep -o 'CHANGE_ME_[A-Z0-9_]*' | sort -u \
              | awk '{ print length($0), $0 }' | sort -rn | cut -d' ' -f2); do
  value=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  printf 's/%s/%s/g\n' "$name" "$value" >> "$tmp"
done
for example in "$dir"/*.env.example; do
  target=${example%.example}
  if [ -e "$target" ]; then
    echo "kept $target"
    continue
  fi
  sed -f "$tmp" "$example" > "$target"
  echo "wrote $target"
done
