#!/usr/bin/env bash
# Download MovieLens ml-latest-small from GroupLens into runs/data/movielens/ (git-ignored;
# needs internet; not run in CI).
# Usage: data/fetch_movielens.sh [DEST_DIR]
# Terms: research use, non-commercial, acknowledge GroupLens (see README.txt inside the archive).
# Note: GroupLens refreshes ml-latest-small over time; the project's reference copy is the
# April-2015 release (100,023 ratings, 706 users) kept in ../shared/data/movielens-latest-small.
set -euo pipefail

URL="${MOVIELENS_URL:-https://files.grouplens.org/datasets/movielens/ml-latest-small.zip}"
DEST="${1:-$(cd "$(dirname "$0")/.." && pwd)/runs/data/movielens}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $URL"
if command -v curl >/dev/null 2>&1; then
  curl -fL --retry 3 -o "$TMP/ml.zip" "$URL"
elif command -v wget >/dev/null 2>&1; then
  wget -q -O "$TMP/ml.zip" "$URL"
else
  echo "need curl or wget" >&2
  exit 1
fi

python3 - "$TMP/ml.zip" "$TMP/out" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY

SRC="$(dirname "$(find "$TMP/out" -name ratings.csv | head -n 1)")"
if [ -z "$SRC" ] || [ ! -f "$SRC/ratings.csv" ]; then
  echo "no ratings.csv in the archive" >&2
  exit 1
fi
mkdir -p "$DEST"
cp "$SRC"/*.csv "$DEST"/
[ -f "$SRC/README.txt" ] && cp "$SRC/README.txt" "$DEST"/
echo "MovieLens in $DEST ($(($(wc -l < "$DEST/ratings.csv") - 1)) ratings)."
echo "Use it with: tandem replay $DEST   or   load_source('movielens', path='$DEST')"
