#!/bin/bash
# The container's health check (deploy/Dockerfile): exit 0 when the daemon on
# 127.0.0.1:$DYNAMITE_HEALTH_PORT answers GET /health with 200, 1 otherwise. With
# DYNAMITE_HEALTH_TLS=1 it only checks that the port takes a connection (bash speaks no
# TLS; a daemon opens its port only once it serves). Uses bash's /dev/tcp: no curl needed.
set -u
# Something else on the port may close on us mid-request: a failed write, not a SIGPIPE death
# (Docker reads only 0 and 1).
trap '' PIPE
port=${DYNAMITE_HEALTH_PORT:-25000}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
if [ "${DYNAMITE_HEALTH_TLS:-}" = 1 ]; then
    exit 0
fi
printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3 2>/dev/null \
    || exit 1
read -r -t 2 status_line <&3 || exit 1
case "$status_line" in
    "HTTP/1."?" 200"*) exit 0 ;;
    *) exit 1 ;;
esac
