#!/usr/bin/env bash
# run.sh: every test of dolly: engine unit tests, the CUDA plugin's kernels under the CPU
# emulator against the CPU backend (tests/gpu/emu), pg_regress on a temporary cluster with
# dolly preloaded, and the server tests (TAP). Installs and builds first (tests/setup.sh).
# PostgreSQL refuses to run as root, so as root the cluster tests run as the unprivileged
# user $DOLLY_TEST_USER (default postgres) in a copy of the tree that user owns.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh

status=0
echo "== engine unit tests"
build/run_tests || status=1

echo "== the CUDA kernels under the CPU emulator (tests/gpu/emu)"
make -s emutest || status=1

echo "== pg_regress and server tests"
if [ "$(id -u)" -eq 0 ]; then
	user=${DOLLY_TEST_USER:-postgres}
	work=$(mktemp -d /tmp/dolly-tests.XXXXXX)
	cp -a . "$work/src"
	chown -R "$user" "$work"
	runner=(runuser -u "$user" --)
	dir=$work/src
else
	runner=()
	dir=$PWD
fi
if ! (cd "$dir" && "${runner[@]}" make -s installcheck); then
	status=1
	if [ -f "$dir/regression.diffs" ]; then
		echo "== regression.diffs"
		cat "$dir/regression.diffs"
	fi
	for f in "$dir"/tmp_check/log/*; do
		[ -f "$f" ] && { echo "== $f (last 50 lines)"; tail -n 50 "$f"; }
	done
fi

if [ $status -eq 0 ]; then echo "== all tests passed"; else echo "== TESTS FAILED"; fi
exit $status
