#!/usr/bin/env bash
# Check dcud's systemd integration without systemd running as PID 1 (CI, containers, a laptop):
#
#   1. systemd-analyze verify   systemd/dcud.service                 must print nothing
#   2. systemd-analyze security --offline=true systemd/dcud.service  exposure <= 2.5 (printed)
#   3. the same two with each drop-in of systemd/dcud.service.d applied (clock-step.conf: dcud sets
#      the clock; snmp-port.conf: the SNMP agent on port 161), then with all of them at once
#   4. systemd-sysusers and systemd-tmpfiles apply dcud's entries to a scratch root
#   4b. the resource limits are set: MemoryMax=, TasksMax= and LimitCORE=0 (docs/systemd.md)
#   5. MemoryDenyWriteExecute=: the Python that runs dcud imports dcud and its dependencies and
#      does AES-256-CBC, TLS setup, a uvloop/asyncio loop and a ctypes callback under the kernel's
#      W^X lock (prctl PR_SET_MDWE, Linux >= 6.3; the same rule as systemd's filter). Skipped, and
#      said so, on older kernels.
#
# Needs: the Debian package `systemd` (systemd-analyze, systemd-sysusers, systemd-tmpfiles) and
# `procps` (/bin/kill, named by ExecReload=, which verify checks), and dcud installed (`pip install .`):
# ExecStart= names /opt/dcud/bin/dcud and verify checks that it exists, so when it does not, the
# checks run on a copy whose ExecStart= names $DCUD_BIN or else `command -v dcud`.
# Run as root for step 4's tmpfiles part (it chowns); other steps need no privileges.
#
# Environment: DCUD_BIN (dcud executable to verify against), DCUD_MAX_EXPOSURE (default 2.5).
# Exit status: 0 all checks passed, 1 a check failed, 2 a required tool or dcud is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="$here/systemd/dcud.service"
dropin_dir="$here/systemd/dcud.service.d"
sysusers="$here/systemd/dcud.sysusers.conf"
tmpfiles="$here/systemd/dcud.tmpfiles.conf"
max_exposure="${DCUD_MAX_EXPOSURE:-2.5}"
unit_exec=/opt/dcud/bin/dcud

failures=0
fail() { echo "   FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "   ok: $*"; }
missing() { echo "check_systemd: $*" >&2; exit 2; }
indent() { while IFS= read -r line; do echo "      $line"; done <<<"$1"; }

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    command -v "$tool" >/dev/null 2>&1 \
        || missing "$tool not found: install the Debian package 'systemd' (apt-get install systemd)"
done
[ -x /bin/kill ] || missing "/bin/kill not found (ExecReload=): install the Debian package 'procps'"
echo "check_systemd: $(systemd-analyze --version | head -n 1)"

# ExecStart= must resolve for verify. Use the unit as written when /opt/dcud/bin/dcud exists.
if [ -x "$unit_exec" ]; then
    dcud_bin="$unit_exec"
else
    dcud_bin="${DCUD_BIN:-$(command -v dcud || true)}"
    if [ -z "$dcud_bin" ] || [ ! -x "$dcud_bin" ]; then
        missing "dcud is not installed ($unit_exec missing, no dcud on PATH): run 'pip install .' first, or set DCUD_BIN"
    fi
    echo "check_systemd: $unit_exec does not exist; checking a copy with ExecStart=$dcud_bin"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# stage DIR [DROPIN...]: the unit (named dcud.service, as installed) with ExecStart= resolved, and
# the given drop-in files next to it.
stage() {
    local dir="$1"
    shift
    mkdir -p "$dir"
    sed "s#^ExecStart=$unit_exec #ExecStart=$dcud_bin #" "$unit" >"$dir/dcud.service"
    grep -q "^ExecStart=$dcud_bin " "$dir/dcud.service" || { echo "ExecStart= not found in $unit" >&2; exit 1; }
    if [ "$#" -gt 0 ]; then
        mkdir -p "$dir/dcud.service.d"
        cp "$@" "$dir/dcud.service.d/"
    fi
}

# check_unit LABEL DIR: verify must be silent and succeed; exposure must not exceed the maximum.
check_unit() {
    local label="$1" file="$2/dcud.service" out rc report exposure
    echo "== systemd-analyze verify ($label)"
    rc=0
    out="$(systemd-analyze verify "$file" 2>&1)" || rc=$?
    if [ "$rc" -eq 0 ] && [ -z "$out" ]; then ok "no output"; else fail "exit $rc, output:"; indent "$out"; fi

    echo "== systemd-analyze security --offline=true ($label)"
    rc=0
    report="$(systemd-analyze security --no-pager --offline=true "$file" 2>&1)" || rc=$?
    exposure="$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9.]*\).*/\1/p')"
    if [ -z "$exposure" ]; then
        fail "no exposure level in the output (exit $rc):"; indent "$report"; return
    fi
    # The settings that still count against the unit, for the record.
    printf '%s\n' "$report" | awk '/✗/ { printf "      %-45s %s\n", $2, $NF }' || true
    echo "   exposure level: $exposure (maximum $max_exposure)"
    if awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }'; then
        ok "exposure $exposure <= $max_exposure"
    else
        fail "exposure $exposure > $max_exposure"
    fi
}

stage "$work/base"
check_unit "dcud.service" "$work/base"
for dropin in "$dropin_dir"/*.conf; do
    name="$(basename "$dropin" .conf)"
    stage "$work/$name" "$dropin"
    check_unit "dcud.service + dcud.service.d/$name.conf" "$work/$name"
done
stage "$work/all-dropins" "$dropin_dir"/*.conf
check_unit "dcud.service + every drop-in" "$work/all-dropins"

echo "== resource limits (MemoryMax=, TasksMax=, LimitCORE=0)"
for setting in 'MemoryMax=[0-9]+[KMG]' 'TasksMax=[0-9]+' 'LimitCORE=0'; do
    line="$(grep -E "^${setting}\$" "$unit" || true)"
    if [ -n "$line" ]; then ok "$line"; else fail "no ${setting%%=*}= (or not a plain limit) in $unit"; fi
done

echo "== systemd-sysusers ($sysusers)"
root="$work/root"
mkdir -p "$root/etc"
# A Debian-like starting point: base-passwd ships group dialout (20); gpio does not exist.
printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
printf 'root:x:0:\ndialout:x:20:\n' >"$root/etc/group"
rc=0
out="$(systemd-sysusers --root="$root" "$sysusers" 2>&1)" || rc=$?
if [ "$rc" -ne 0 ]; then
    fail "systemd-sysusers exit $rc:"; indent "$out"
else
    entry="$(grep '^dcud:' "$root/etc/passwd" || true)"
    if [ -n "$entry" ] && [ "$(echo "$entry" | cut -d: -f6)" = /var/lib/dcud ] \
        && [ "$(echo "$entry" | cut -d: -f3)" -lt 1000 ]; then ok "system user: $entry"; else fail "user dcud: '$entry'"; fi
    for group in dialout gpio; do
        if grep -Eq "^$group:x:[0-9]+:(.*,)?dcud(,.*)?$" "$root/etc/group"; then ok "dcud is in group $group"
        else fail "dcud is not in group $group"; fi
    done
fi

echo "== systemd-tmpfiles ($tmpfiles)"
if [ "$(id -u)" -ne 0 ]; then
    echo "   skipped: needs root (it changes ownership)"
else
    mkdir -p "$root/etc/dcud/tls"
    : >"$root/etc/dcud/dcud.toml"; chmod 0644 "$root/etc/dcud/dcud.toml"
    : >"$root/etc/dcud/tls/client.key"; chmod 0600 "$root/etc/dcud/tls/client.key"
    rc=0
    out="$(systemd-tmpfiles --create --root="$root" "$tmpfiles" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then fail "systemd-tmpfiles exit $rc:"; indent "$out"; fi
    gid="$(grep '^dcud:' "$root/etc/group" | cut -d: -f3)"
    expect() {  # PATH MODE UID GID
        local got
        got="$(stat -c '%a %u %g' "$root$1")"
        if [ "$got" = "$2 $3 $4" ]; then ok "$1 $got"; else fail "$1 is '$got', expected '$2 $3 $4'"; fi
    }
    expect /etc/dcud/dcud.toml 640 0 "$gid"
    expect /etc/dcud/tls 750 0 "$gid"
    expect /etc/dcud/tls/client.key 640 0 "$gid"
    expect /var/lib/dcud 750 "$(grep '^dcud:' "$root/etc/passwd" | cut -d: -f3)" "$gid"
fi

echo "== MemoryDenyWriteExecute= (PR_SET_MDWE) with the Python that runs dcud"
# The interpreter named by the console script's #! line; a wrapper (env, a pyenv shim) -> python3.
read -r shebang <"$dcud_bin" || true
python="$(echo "${shebang#\#!}" | awk '{ print ($1 ~ /\/env$/) ? $2 : $1 }')"
case "$(basename -- "${python:-none}")" in
    python*) python="$(command -v "$python" || true)" ;;
    *) python="" ;;
esac
python="${python:-$(command -v python3 || true)}"
[ -n "$python" ] || missing "no Python interpreter found for $dcud_bin"
echo "   python: $python"
# One run without and one with the W^X lock: only what works without it and breaks with it fails.
mdwe_probe="$(cat <<'PY'
import ctypes, importlib, json, os, pkgutil, sys
if sys.argv[1] == "mdwe":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print(json.dumps({"unsupported": os.strerror(ctypes.get_errno())})); sys.exit(0)
results = {}
def attempt(name, fn):
    try:
        fn(); results[name] = "ok"
    except BaseException as exc:  # noqa: BLE001 - report everything, including SystemExit
        results[name] = f"{type(exc).__name__}: {exc}"
def walk_dcud():
    import dcud
    for mod in pkgutil.walk_packages(dcud.__path__, "dcud."):
        attempt(mod.name, lambda n=mod.name: importlib.import_module(n))
def aes_cbc():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key, iv = os.urandom(32), os.urandom(16)
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    data = enc.update(b"\0" * 64) + enc.finalize()
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    assert dec.update(data) + dec.finalize() == b"\0" * 64
def event_loop():
    import asyncio
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0)); loop.close()
def ctypes_callback():
    assert ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(1) == 2
for mod in ("dcud", "msgspec", "structlog", "serial", "serial_asyncio", "can", "canopen", "pymodbus",
            "aiomqtt", "aioftp", "ntplib", "h11", "cryptography", "uvloop", "pysnmp.hlapi.v3arch.asyncio"):
    attempt(mod, lambda m=mod: importlib.import_module(m))
attempt("dcud.*", walk_dcud)
attempt("AES-256-CBC", aes_cbc)
attempt("ssl context", lambda: __import__("ssl").create_default_context())
attempt("event loop", event_loop)
attempt("ctypes callback", ctypes_callback)
print(json.dumps(results))
PY
)"
rc=0
plain="$("$python" -c "$mdwe_probe" plain 2>&1)" || rc=$?
locked="$("$python" -c "$mdwe_probe" mdwe 2>&1)" || rc=$?
if [ "$rc" -ne 0 ]; then
    fail "probe crashed:"; indent "$plain"; indent "$locked"
else
    verdict="$("$python" - "$plain" "$locked" <<'PY'
import json, sys
plain, locked = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if "unsupported" in locked:
    print(f"SKIP kernel has no PR_SET_MDWE ({locked['unsupported']}); not checked"); sys.exit()
passed = []
for name, outcome in plain.items():
    if outcome != "ok":
        print(f"NOTE {name}: fails even without the lock: {outcome}")
    elif locked.get(name) != "ok":
        print(f"FAIL {name}: {locked.get(name)}")
    else:
        passed.append(name)
print(f"OK {len(passed)} of {len(plain)} work with the lock: {', '.join(passed)}")
PY
)"
    while IFS= read -r line; do
        case "$line" in
            FAIL*) fail "${line#FAIL }" ;;
            OK*) ok "${line#OK }" ;;
            *) echo "   $line" ;;
        esac
    done <<<"$verdict"
fi

echo
if [ "$failures" -ne 0 ]; then
    echo "check_systemd: $failures check(s) failed"
    exit 1
fi
echo "check_systemd: all checks passed"
