#!/usr/bin/env bash
# s3mount quick start: a local S3 server (moto), a bucket `demo` holding hello.txt, and s3mount
# mounting it. No AWS account needed. Run from anywhere in a checkout, as root (or a user with
# sudo for apt-get and fusermount3 for the mount).
#
#   scripts/quickstart.sh          set up, mount on /tmp/demo, read hello.txt
#   scripts/quickstart.sh stop     unmount and stop the moto server this script started
#
# Environment:
#   PORT=N          port for moto on 127.0.0.1 (default: a free one)
#   MNT=DIR         mount point (default: /tmp/demo)
#   S3MOUNT=PATH    an s3mount binary to use instead of running `cargo build --release`
#   VENV=DIR        virtualenv for moto (default: ~/.moto-venv)
set -euo pipefail

MNT=${MNT:-/tmp/demo}
VENV=${VENV:-$HOME/.moto-venv}
PIDFILE=/tmp/s3mount-quickstart.pid
MNTFILE=/tmp/s3mount-quickstart.mnt
LOG=/tmp/s3mount-quickstart-moto.log
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/quickstart.sh"

say() { echo "quickstart: $*"; }
die() { echo "quickstart: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The moto server started by an earlier run, if it is still running.
running_moto() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && grep -qa moto.server "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

unmount() {
  if [ "$(id -u)" = 0 ]; then umount "$1"; else fusermount3 -u "$1"; fi
}

stop() {
  local mnt pid
  mnt=$(cat "$MNTFILE" 2>/dev/null || echo "$MNT")
  if mountpoint -q "$mnt"; then
    unmount "$mnt" || die "could not unmount $mnt (files still open? see: fuser -vm $mnt); close them and run '$SELF stop' again"
    say "unmounted $mnt"
  fi
  if pid=$(running_moto); then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    say "stopped moto (pid $pid)"
  elif [ -f "$PIDFILE" ]; then
    say "moto of the last quick start (pid $(cat "$PIDFILE")) is not running any more"
  else
    say "no quick start server is running"
  fi
  rm -f "$PIDFILE" "$MNTFILE"
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
elif [ $# -gt 0 ]; then
  die "unknown argument '$1' (usage: $0 [stop])"
fi

if pid=$(running_moto); then
  die "a quick start is already running (moto pid $pid); run '$SELF stop' first"
fi
if mountpoint -q "$MNT"; then
  die "$MNT is already a mount point; unmount it (umount $MNT) or choose another with MNT=DIR"
fi

if [ -n "${PORT:-}" ]; then
  [[ $PORT =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "PORT=$PORT is not a port number"
fi
if [ -n "${S3MOUNT:-}" ]; then
  [ -x "$S3MOUNT" ] || die "S3MOUNT=$S3MOUNT is not an executable file"
else
  command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs (or set S3MOUNT=/path/to/s3mount)"
fi

# 1. moto in a virtualenv. Debian 12 and Ubuntu 23.04+ refuse pip installs into the system
# Python (PEP 668), and fresh installs lack pip and venv.
if [ ! -x "$VENV/bin/pip" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    say "installing python3-venv"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
  say "installing moto and boto3 into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' boto3
fi
PY="$VENV/bin/python"

# 2. The port, if one was asked for, must be free now (checked again by moto when it starts).
port_free() {
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}
if [ -n "${PORT:-}" ]; then
  port_free "$PORT" || die "port $PORT on 127.0.0.1 is already in use; choose another (PORT=N) or leave PORT unset to pick a free one"
fi

# 3. s3mount: build it unless a binary was given. Built before the server starts, so a failed
# build leaves nothing running.
if [ -z "${S3MOUNT:-}" ]; then
  say "building s3mount (cargo build --release)"
  (cd "$ROOT" && cargo build --release)
  S3MOUNT="${CARGO_TARGET_DIR:-$ROOT/target}/release/s3mount"
fi
if [ -z "${PORT:-}" ]; then
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
ENDPOINT="http://127.0.0.1:$PORT"

# 4. Start moto and wait until it answers (up to 30 s).
nohup "$PY" -m moto.server -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 </dev/null &
MOTO_PID=$!
echo "$MOTO_PID" >"$PIDFILE"
echo "$MNT" >"$MNTFILE"
# Until the mount is up, a failure stops the server again.
cleanup() { kill "$MOTO_PID" 2>/dev/null || true; rm -f "$PIDFILE" "$MNTFILE"; }
trap cleanup EXIT

say "starting moto on $ENDPOINT (pid $MOTO_PID, log $LOG)"
waited=0
"$PY" - "$ENDPOINT" "$MOTO_PID" <<'EOF' || waited=$?
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 30
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(2)  # the server exited
    try:
        urllib.request.urlopen(url + "/", timeout=1).read()
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(1)
EOF
case $waited in
  0) ;;
  2) die "moto exited while starting on $ENDPOINT; see $LOG" ;;
  *) die "moto did not answer on $ENDPOINT within 30 s; see $LOG" ;;
esac

# 5. The bucket and its file.
"$PY" - "$ENDPOINT" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
s3.create_bucket(Bucket="demo")
s3.put_object(Bucket="demo", Key="hello.txt", Body=b"hello from s3mount\n")
EOF

# 6. Mount and read.
mkdir -p "$MNT"
say "mounting bucket demo on $MNT"
AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$S3MOUNT" demo "$MNT" \
  --endpoint-url "$ENDPOINT" --region us-east-1 --force-path-style
trap - EXIT
status=0
echo "\$ cat $MNT/hello.txt"
cat "$MNT/hello.txt" || status=1
echo
if [ "$(id -u)" = 0 ]; then UMOUNT="umount $MNT"; else UMOUNT="fusermount3 -u $MNT"; fi
cat <<EOF
Bucket demo at $ENDPOINT is mounted on $MNT. Try: ls -l $MNT; echo hi > $MNT/new.txt
moto's log: $LOG

To stop everything:
  $UMOUNT && kill $MOTO_PID
or:
  $SELF stop
EOF
exit "$status"
