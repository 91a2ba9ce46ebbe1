#!/bin/sh
# Make this Debian 12 / Ubuntu 22.04+ host a piku host, as root:
#   sh install.sh [--key ~/alice.pub] [--user piku]
# It installs Python 3 if the host has none, then runs `python3 piku.py install` (see
# `python3 piku.py install --help` and docs/INSTALL.md). Running it again changes nothing.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" != 0 ]; then
  echo " !     install.sh needs root: sudo sh install.sh $*" >&2
  exit 1
fi
if ! [ -x /usr/bin/python3 ]; then
  echo "-----> Installing python3 (a minimal Debian has none)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3
fi
exec /usr/bin/python3 "$HERE/piku.py" install "$@"
