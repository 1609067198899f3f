#!/usr/bin/env bash
# Debian's Chromium (and its ChromeDriver) for tests/integration/test_mlflow_ui_browser.py, installed with apt.
# Idempotent: nothing is installed when /usr/bin/chromium already runs. Never fails CI: when apt is missing or
# fails, it says why and exits 0, and the browser test then skips with its reason. Playwright drives this binary
# (executable_path); its own browser download cannot work on these machines.
#
#   bash .ci/browser-deps.sh            # install if needed, then print the version
set -u

log() { echo ".ci/browser-deps.sh: $*" >&2; }
why() { if [ "$1" = 124 ]; then echo "timed out"; else echo "exit $1"; fi; }

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"  # where Debian's package puts it (the tests look there too)
APT_LOG="${TMPDIR:-/tmp}/browser-deps-apt.log"

have_chromium() { [ -x "$CHROMIUM" ] && "$CHROMIUM" --headless --no-sandbox --version >/dev/null 2>&1; }

if have_chromium; then
    log "Chromium present: $("$CHROMIUM" --headless --no-sandbox --version 2>/dev/null)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get on this machine; not installing Chromium (the browser test will skip)"
    exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        log "not root and no password-less sudo; not installing Chromium (the browser test will skip)"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# Bounded: a hung mirror must not hold CI up for long.
rc=0
timeout 300 "${sudo[@]}" apt-get update -q >"$APT_LOG" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
    log "apt-get update failed ($(why "$rc")); last lines of $APT_LOG:"
    tail -n 5 "$APT_LOG" >&2
    exit 0
fi
timeout 600 "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver >>"$APT_LOG" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
    log "apt-get install chromium chromium-driver failed ($(why "$rc")); last lines of $APT_LOG:"
    tail -n 5 "$APT_LOG" >&2
    exit 0
fi
if have_chromium; then
    log "installed $("$CHROMIUM" --headless --no-sandbox --version 2>/dev/null)"
else
    log "chromium was installed but does not start; the browser test will skip or fail with the reason"
fi
exit 0
