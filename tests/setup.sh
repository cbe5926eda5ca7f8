#!/usr/bin/env bash
# setup.sh: install what dolly needs from Debian, then build and install it.
# Run as root (or with sudo available). Idempotent: a second run only rebuilds.
#   CUDA=0 bash tests/setup.sh    skips the CUDA plugin even where nvcc exists
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

PACKAGES="build-essential pkg-config postgresql-15 postgresql-server-dev-15 libopenblas-dev
	libjson-c-dev libpcre2-dev libipc-run-perl libkrb5-dev libicu-dev python3"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $PACKAGES 2>/dev/null |
	awk '$NF != "installed" {print $1}'; for p in $PACKAGES; do
	dpkg-query -W "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
	echo "setup: installing $(echo $missing | tr '\n' ' ')"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
		$(echo $missing | sort -u) >/dev/null
fi

make -s -j"$(nproc)" CUDA="${CUDA:-auto}"
$SUDO make -s install CUDA="${CUDA:-auto}" >/dev/null
echo "setup: dolly built and installed into $(pg_config --pkglibdir)"
