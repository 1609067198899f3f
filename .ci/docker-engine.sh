#!/usr/bin/env bash
# Start or stop a private Docker engine for the image tests (tests/images), kept off the network:
#
#   .ci/docker-engine.sh start    install docker.io/iptables/debootstrap if missing (root + apt), start dockerd
#   .ci/docker-engine.sh stop     stop the dockerd this script started (data-root kept: it is the build cache)
#   .ci/docker-engine.sh status   exit 0 if the engine answers
#   .ci/docker-engine.sh host     print the DOCKER_HOST value (unix://.../docker.sock)
#   .ci/docker-engine.sh purge    stop, then delete the state folder (images and build cache)
#
# start and stop are idempotent. The engine runs with its own socket, pid file, exec-root and data-root under
# $REFINE_DOCKER_DIR (default /tmp/refine-docker); it never touches iptables and creates no bridge
# (--bridge=none --iptables=false --ip-masq=false, see shared/docs/mlops-notes.md §3.2): containers run with
# --network none, builds that need PyPI with --network host. `start` writes $REFINE_DOCKER_DIR/docker.env
# (DOCKER_HOST=...), which tests/images reads when DOCKER_HOST is not exported.
set -euo pipefail

STATE_DIR="${REFINE_DOCKER_DIR:-/tmp/refine-docker}"
SOCK="$STATE_DIR/docker.sock"
PIDFILE="$STATE_DIR/dockerd.pid"
LOG="$STATE_DIR/dockerd.log"
ENV_FILE="$STATE_DIR/docker.env"
HOST="unix://$SOCK"
START_TIMEOUT_S="${REFINE_DOCKER_START_TIMEOUT_S:-60}"
APT_TIMEOUT_S="${REFINE_DOCKER_APT_TIMEOUT_S:-300}"

say() { echo "docker-engine: $*" >&2; }
die() { say "$*"; exit 1; }

docker_cli() {
    # Any docker client works against the 20.10 engine (the API version is negotiated).
    command -v docker >/dev/null 2>&1 || return 1
    DOCKER_HOST="$HOST" docker "$@"
}

running_pid() {
    # The pid of the dockerd this script started, if it is still alive; nothing otherwise.
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == dockerd ]] || return 1
    echo "$pid"
}

answers() { docker_cli version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_if_missing() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)  # dockerd refuses to start without the binary
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)  # makes the local base image
    command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    ((${#missing[@]} == 0)) && return 0
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "missing ${missing[*]} and cannot install them (needs root and apt-get)"
    fi
    say "installing ${missing[*]} with apt-get"
    # The package's post-install must not start the system dockerd, which would create docker0 on a private
    # range: a policy-rc.d that denies service starts (if none exists) holds it back during the install.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    timeout "$APT_TIMEOUT_S" apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$STATE_DIR/apt.log" 2>&1 \
        || { timeout "$APT_TIMEOUT_S" apt-get update -qq >>"$STATE_DIR/apt.log" 2>&1 \
            && timeout "$APT_TIMEOUT_S" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
                >>"$STATE_DIR/apt.log" 2>&1; } || rc=$?
    ((created_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc); last lines of $STATE_DIR/apt.log:
$(tail -n 5 "$STATE_DIR/apt.log")"
}

check_no_bridge() {
    if ip link show docker0 >/dev/null 2>&1; then
        say "WARNING: a docker0 interface exists (not created by this engine, which runs with --bridge=none)"
    fi
}

cmd_start() {
    mkdir -p "$STATE_DIR"
    chmod 700 "$STATE_DIR"
    if running_pid >/dev/null && answers; then
        say "already running (pid $(running_pid)), DOCKER_HOST=$HOST"
        echo "DOCKER_HOST=$HOST" >"$ENV_FILE"
        return 0
    fi
    install_if_missing
    [[ "$(id -u)" == 0 ]] || die "dockerd needs root (running as uid $(id -u))"
    if pid="$(running_pid)"; then
        say "dockerd pid $pid does not answer: stopping it first"
        cmd_stop
    fi
    rm -f "$SOCK" "$ENV_FILE"
    mkdir -p "$STATE_DIR/data" "$STATE_DIR/exec"
    say "starting dockerd (socket $SOCK, data-root $STATE_DIR/data, log $LOG)"
    # setsid: own session, so that the CI shell's job control cannot stop it and stop can signal it alone.
    setsid dockerd \
        --host "$HOST" \
        --pidfile "$PIDFILE" \
        --data-root "$STATE_DIR/data" \
        --exec-root "$STATE_DIR/exec" \
        --bridge=none \
        --iptables=false \
        --ip6tables=false \
        --ip-masq=false \
        --userland-proxy=false \
        --log-level=warn \
        </dev/null >"$LOG" 2>&1 &
    local launcher=$! waited=0
    until answers; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            die "dockerd exited during start-up; last lines of $LOG:
$(tail -n 15 "$LOG")"
        fi
        if ((waited >= START_TIMEOUT_S)); then
            kill "$launcher" 2>/dev/null || true
            die "dockerd did not answer on $SOCK within ${START_TIMEOUT_S}s; last lines of $LOG:
$(tail -n 15 "$LOG")"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    check_no_bridge
    echo "DOCKER_HOST=$HOST" >"$ENV_FILE"
    say "ready after ${waited}s: engine $(docker_cli version --format '{{.Server.Version}}'), DOCKER_HOST=$HOST"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        say "not running"
        rm -f "$SOCK" "$ENV_FILE"
        return 0
    fi
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "dockerd pid $pid still alive after 30s: sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$SOCK" "$ENV_FILE" "$PIDFILE"
    say "stopped"
}

cmd_purge() {
    cmd_stop
    say "deleting $STATE_DIR"
    # Mounts left by a killed engine would make rm fail on busy overlay directories.
    if grep -q " $STATE_DIR/" /proc/mounts 2>/dev/null; then
        grep " $STATE_DIR/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    fi
    rm -rf "$STATE_DIR"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status)
        if running_pid >/dev/null && answers; then
            say "running (pid $(running_pid)), DOCKER_HOST=$HOST"
        else
            say "not running"
            exit 1
        fi
        ;;
    host) echo "$HOST" ;;
    purge) cmd_purge ;;
    *) die "usage: $0 start|stop|status|host|purge" ;;
esac
