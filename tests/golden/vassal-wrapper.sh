#!/bin/sh
# written by piku: the uWSGI emperor starts every vassal through this (emperor-wrapper).
# A vassal runs as piku described it in /home/piku/.piku/sandbox: in its app's sandbox (NAME.view,
# bubblewrap's arguments), or as it is when it is one of piku's own (NAME.host). Any other is not started.
[ "$#" = 2 ] && [ "$1" = --ini ] || { echo "piku: unexpected vassal arguments: $*" >&2; exit 1; }
name=${2##*/}
name=${name%.ini}
case "$name" in *[!A-Za-z0-9@._-]*|.*) echo "piku: refused the vassal name $name" >&2; exit 1;; esac
description=/home/piku/.piku/sandbox/$name
if [ -f "$description.view" ]; then
    exec /usr/bin/bwrap --args 3 --setenv UWSGI_EMPEROR_FD "$UWSGI_EMPEROR_FD" --info-fd 4 --seccomp 5 \
        -- /usr/bin/uwsgi "$@" 3<"$description.view" 4>"$description.info" 5</home/piku/.piku/sandbox/worker.seccomp
elif [ -f "$description.host" ]; then
    exec /usr/bin/uwsgi "$@"
fi
echo "piku: $name has no description in /home/piku/.piku/sandbox: not started" >&2
exit 1
