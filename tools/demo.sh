#!/bin/sh
# make demo: a throwaway PIKU_ROOT, a real uWSGI emperor, a real `git push` of
# examples/web, and the app's answer over HTTP. Stops what it started unless DEMO_KEEP=1.
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
WORK=$(mktemp -d /tmp/piku-demo.XXXXXX)
export PIKU_ROOT="$WORK/piku"
PIKU="$PYTHON $HERE/piku.py"

echo "== piku demo in $WORK"
$PIKU setup
uwsgi --ini "$PIKU_ROOT/uwsgi/uwsgi.ini" >/dev/null 2>&1 &
EMPEROR=$!
stop() {
  if [ "${DEMO_KEEP:-0}" = 1 ]; then
    echo "== left running: stop with  kill $EMPEROR; rm -rf $WORK"
  else
    echo "== stopping the uWSGI emperor (pid $EMPEROR) and removing $WORK"
    kill "$EMPEROR" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$EMPEROR" 2>/dev/null || break; sleep 0.2; done
    rm -rf "$WORK"
  fi
}
trap stop EXIT

cp -r "$HERE/examples/web" "$WORK/hello"
cd "$WORK/hello"
git init -q -b main
git add -A
git -c user.name=demo -c user.email=demo@example.com commit -qm "hello, piku"
echo "== git push (local transport into piku's git-receive-pack)"
git push --receive-pack="env PIKU_ROOT=$PIKU_ROOT $PYTHON $HERE/piku.py git-receive-pack" hello main

URL=$(sed -n "s/^PORT='\([0-9]*\)'/http:\/\/127.0.0.1:\1\//p" "$PIKU_ROOT/envs/hello/LIVE_ENV")
echo "== $URL answers:"
for _ in $(seq 100); do
  if ANSWER=$($PYTHON -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')" "$URL" 2>/dev/null); then
    printf '%s\n' "$ANSWER"
    exit 0
  fi
  sleep 0.2
done
echo "the app did not answer; its log:" >&2
cat "$PIKU_ROOT/logs/hello/"*.log >&2
exit 1
