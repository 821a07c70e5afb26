#!/usr/bin/env bash
# Fills fuzz/corpus/ (git-ignored) with seed inputs: the WorkOS fixtures for `event`,
# a few `WorkOS-Signature` headers (header, newline, body) for `signature`.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/event corpus/signature
cp ../fixtures/workos/*.json corpus/event/

body='{"id":"event_1","event":"organization_membership.updated"}'
# HMAC-SHA256 of "1700000000000.$body" under "secret".
good=c2a127ebabeb0e442d3a6ed3b68d22be5986485e2c6ab0e6fb0df7d89205930d
zeros=0000000000000000000000000000000000000000000000000000000000000000
i=0
for header in \
    "t=1700000000000, v1=$good" \
    "t=1700000000000,v1=$good" \
    "  v1=$good ,   t=1700000000000  " \
    "t=1700000000000, v1=$zeros, v1=$good" \
    "v0=$zeros, t=1700000000000, junk, v1=abc, x=y=z, v1=$good" \
    "t=1700000000000, t=1700000000000, v1=$good" \
    "t=99999999999999999999, v1=$good" \
    "t=+5, v1=$zeros" \
    "t=1700000000000" \
    "T=1700000000000, V1=$good" \
    ""; do
    printf '%s\n%s' "$header" "$body" > "corpus/signature/seed-$i"
    i=$((i + 1))
done
echo "seeded $(ls corpus/event | wc -l) event and $(ls corpus/signature | wc -l) signature inputs"
