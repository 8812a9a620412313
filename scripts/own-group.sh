#!/usr/bin/env bash
# Runs a server command in its own process group (setsid) and, when this script is stopped
# (Ctrl-C, SIGTERM) or the server exits, signals that whole group: MLflow 3's servers start
# helper processes (a job runner, huey consumers) that outlive a signal to the main pid alone.
# usage: scripts/own-group.sh COMMAND [ARGS...]
set -u
setsid "$@" &
group=$!  # a background job of a non-interactive shell is no group leader: setsid execs in place

stop() {
    kill -TERM -- "-$group" 2>/dev/null || return 0
    for _ in $(seq 1 40); do
        kill -0 -- "-$group" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL -- "-$group" 2>/dev/null
}

trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT
wait "$group"
