#!/bin/sh
# make demo: the main job of piku, for real -- a throwaway PIKU_ROOT, a real uWSGI emperor and
# real `git push`es of a uv app (examples/flask-uwsgi: pyproject.toml + uv.lock, `wsgi:`):
#   1. the first push picks the Python and builds the environment with uv;
#   2. a code-only push skips `uv sync` and serves the new code;
#   3. config:set PYTHON_VERSION switches Python, when uv finds a second one (else: how to get one).
# Stops what it started unless DEMO_KEEP=1.
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
WORK=$(mktemp -d /tmp/piku-demo.XXXXXX)
export PIKU_ROOT="$WORK/piku"
PIKU="$PYTHON $HERE/piku.py"
# uv from the checkout's .venv (make deps installs it) when it is not on PATH
[ -x "$HERE/.venv/bin/uv" ] && mkdir -p "$WORK/bin" && ln -s "$HERE/.venv/bin/uv" "$WORK/bin/uv" && PATH="$WORK/bin:$PATH"
# a second Python, found the way uv finds them (its own, those on PATH) or a pyenv build
# (tools/pythons.py), offered to the demo's uv as a managed Python: nothing is downloaded
SECOND=""
UV=$(command -v uv || true)
FOUND=$($PYTHON "$HERE/tools/pythons.py" "$UV" | grep -v '^3\.11 ' | tail -n 1 || true)
export UV_PYTHON_INSTALL_DIR="$WORK/pythons" UV_PYTHON_DOWNLOADS=never
mkdir -p "$UV_PYTHON_INSTALL_DIR"
if [ -n "$FOUND" ]; then
  set -- $FOUND
  case "$3" in
    /usr|/usr/local) ;;      # a system Python (Ubuntu's python3.12): uv finds it on PATH as it is
    *) $PYTHON "$HERE/tools/pythons.py" --copy "$3" "$UV_PYTHON_INSTALL_DIR/cpython-$2-linux-x86_64-gnu" ;;
  esac
  SECOND=$1
fi

echo "== piku demo in $WORK"
$PIKU setup >/dev/null
uwsgi --ini "$PIKU_ROOT/uwsgi/uwsgi.ini" >/dev/null 2>&1 &
EMPEROR=$!
stop() {
  if [ "${DEMO_KEEP:-0}" = 1 ]; then
    echo "== left running: stop with  kill $EMPEROR; rm -rf $WORK"
  else
    echo "== stopping the uWSGI emperor (pid $EMPEROR) and removing $WORK"
    kill -INT "$EMPEROR" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$EMPEROR" 2>/dev/null || break; sleep 0.2; done
    rm -rf "$WORK"
  fi
}
trap stop EXIT

answer() {   # the app's answer on PORT, once it has one that contains $1
  URL=$(sed -n "s/^PORT='\?\([0-9]*\)'\?$/http:\/\/127.0.0.1:\1\//p" "$PIKU_ROOT/envs/shop/LIVE_ENV")
  for _ in $(seq 150); do
    if ANSWER=$($PYTHON -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')" "$URL" 2>/dev/null) \
       && printf '%s' "$ANSWER" | grep -q "$1"; then
      echo "== $URL answers: $ANSWER"
      return 0
    fi
    sleep 0.2
  done
  echo "the app did not answer with '$1'; its logs:" >&2
  cat "$PIKU_ROOT/logs/shop/"*.log >&2
  exit 1
}
push() {
  git -c user.name=demo -c user.email=demo@example.com commit -qam "$1"
  echo "== git push: $1"
  git push -q --receive-pack="env PIKU_ROOT=$PIKU_ROOT $PYTHON $HERE/piku.py git-receive-pack" shop HEAD:main 2>&1 \
    | sed -n 's/^remote: //p' | sed 's/ *$//'
}

cp -r "$HERE/examples/flask-uwsgi" "$WORK/shop"
cd "$WORK/shop"
git init -q -b main && git add -A
push "a uv app: pyproject.toml + uv.lock, wsgi: wsgi:app"
answer "Hello from shop"

sed -i 's/Hello from/Howdy from/' wsgi.py
push "a code-only change: uv sync is skipped"
answer "Howdy from shop"

if [ -n "$SECOND" ]; then
  echo "== config:set shop PYTHON_VERSION=$SECOND (this machine has Python $SECOND besides Debian's 3.11)"
  $PIKU config:set shop "PYTHON_VERSION=$SECOND"
  answer "on Python $SECOND"
else
  echo "== this machine has no Python besides Debian's 3.11, so the PYTHON_VERSION switch is not shown;"
  echo "   to see it: $HERE/.venv/bin/uv python install 3.12  (where uv may download), then make demo"
fi
