#!/bin/sh
# The README's fresh-machine steps, run as written on a minimal Debian 12, as root:
#   sh tools/fresh-debian.sh [FOLDER]          (default: /var/tmp/piku-fresh-debian)
# 1. debootstrap --variant=minbase bookworm into FOLDER/root (a fresh one each run);
# 2. mounts /proc, /sys and /dev into it, lets apt start no service, copies resolv.conf and, for a host behind an
#    intercepting proxy, the extra CA certificates in /usr/local/share/ca-certificates (its
#    ca-certificates package trusts them once the README's first line installs it) and the
#    proxy and certificate variables of this environment;
# 3. offers this checkout (a git repository) as REPO=/src, read-only;
# 4. runs the lines of the README's fresh-machine block in the chroot, as root, in /root;
# 5. unmounts what it mounted (the folder stays, for a look; remove it with rm -rf).
# Needs debootstrap (apt-get install debootstrap), ~4 GB and the Debian mirror and PyPI.
# It takes the time of `make test` (~15 minutes on 2 cores) plus a few minutes.
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
BASE=${1:-/var/tmp/piku-fresh-debian}
TARGET="$BASE/root"
MIRROR=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo " !     run it as root: sudo sh $0" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo " !     install debootstrap first: apt-get install debootstrap" >&2; exit 1; }

MOUNTED=""
cleanup() {
  for point in $MOUNTED; do umount -R "$point" 2>/dev/null || umount -l "$point" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

if [ -e "$TARGET" ]; then
  if grep -q " $TARGET/" /proc/mounts; then echo " !     $TARGET has mounts left: umount them first" >&2; exit 1; fi
  rm -rf "$TARGET"
fi
mkdir -p "$BASE"
echo "-----> debootstrap --variant=minbase bookworm $TARGET"
debootstrap --variant=minbase bookworm "$TARGET" "$MIRROR" > "$BASE/debootstrap.log" 2>&1 \
  || { tail -20 "$BASE/debootstrap.log" >&2; exit 1; }

for fs in proc sys dev; do
  mkdir -p "$TARGET/$fs"
  mount --rbind "/$fs" "$TARGET/$fs" && mount --make-rslave "$TARGET/$fs"
  MOUNTED="$TARGET/$fs $MOUNTED"
done
mkdir -p "$TARGET/src"
mount --bind "$HERE" "$TARGET/src" && mount -o remount,bind,ro "$TARGET/src"
MOUNTED="$TARGET/src $MOUNTED"
cp /etc/resolv.conf "$TARGET/etc/resolv.conf"
# a chroot starts no services when packages are installed (as Debian's container images): the
# packages' nginx and sshd would listen on every address
printf '#!/bin/sh\nexit 101\n' > "$TARGET/usr/sbin/policy-rc.d" && chmod +x "$TARGET/usr/sbin/policy-rc.d"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$TARGET/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$TARGET/usr/local/share/ca-certificates/"
fi

# the README's block: the lines between its marker and the end of the fenced block
STEPS=$(sed -n '/<!-- fresh-machine steps/,/^```$/p' "$HERE/README.md" | sed '1,2d;$d')
[ -n "$STEPS" ] || { echo " !     README.md has no fresh-machine block" >&2; exit 1; }
echo "-----> the README's steps, in the chroot:"
printf '%s\n' "$STEPS" | sed 's/^/       /'
PASSED=$(env | grep -E '^((https?|no|all)_proxy|(HTTPS?|NO|ALL)_PROXY|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|PIP_CERT|NODE_EXTRA_CA_CERTS)=' || true)
started=$(date +%s)
# shellcheck disable=SC2086
{ chroot "$TARGET" /usr/bin/env -i HOME=/root TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    REPO=/src $PASSED /bin/sh -euc "cd /root; $STEPS"; echo $? > "$BASE/status"; } 2>&1 | tee "$BASE/steps.log"
status=$(cat "$BASE/status")
echo "-----> the README's steps exited $status after $(( $(date +%s) - started )) s (log: $BASE/steps.log)"
exit "$status"
