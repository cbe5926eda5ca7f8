#!/bin/bash
# pack_deps.sh: json-c and OpenBLAS as this machine has them (headers, shared libraries,
# and the libgfortran and libquadmath that OpenBLAS loads) into build/gpu-deps/deps.tar.xz,
# for run.sh on a GPU machine without them (see tests/gpu/README.md). About 5 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=build/gpu-deps
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/include" "$stage/lib" "$out"

# a library's real file under its soname, and the plain name the linker looks for
add_lib() {
	local real soname
	real=$(readlink -f "$1")
	soname=$(objdump -p "$real" | awk '/SONAME/ {print $2}')
	cp "$real" "$stage/lib/$soname"
	[ -n "${2:-}" ] && ln -sf "$soname" "$stage/lib/$2"
	return 0
}

cp -r "$(pkg-config --variable=includedir json-c)/json-c" "$stage/include/"
cblas_dir=$(pkg-config --cflags-only-I openblas | sed 's/^-I//; s/ *$//')
cp "$cblas_dir"/*.h "$stage/include/"
add_lib "$(gcc -print-file-name=libjson-c.so)" libjson-c.so
blas=$(readlink -f "$(gcc -print-file-name=libopenblas.so)")
add_lib "$blas" libopenblas.so
for dep in $(ldd "$blas" | awk '/gfortran|quadmath/ {print $3}'); do
	add_lib "$dep"
done
tar -C "$stage" -cJf "$out/deps.tar.xz" include lib
ls -l "$out/deps.tar.xz"
