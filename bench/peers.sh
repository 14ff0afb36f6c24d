#!/usr/bin/env bash
# bench/peers.sh: cuttle side by side with Squid and tinyproxy on this machine, in one run
# (issue 7). Prints one markdown table with absolute numbers and ratios.
#
# What it does:
#   1. installs squid, tinyproxy and wrk from Debian's packages if missing (apt-get);
#   2. builds cuttle (cargo build --release) and the bench helpers in bench/origin;
#   3. starts three local origins (HTTP 1 KiB keep-alive, TCP echo, bulk sink/source) and the
#      three proxies, each with an equivalent allowlist (.example.com), all on 127.0.0.1;
#   4. runs each workload against direct / Squid / tinyproxy / cuttle in turn, BENCH_RUNS times
#      (median reported):
#        a. plain HTTP keep-alive, absolute-form, wrk with 64 connections: req/s, p99 latency;
#        b. CONNECT tunnels/s: 64 workers, connect -> CONNECT -> 200 -> ClientHello + 64 bytes
#           echoed -> close (the first bytes of every tunnel are a TLS ClientHello naming the
#           CONNECT host, so cuttle's default SNI check runs as in production);
#        c. bulk through one tunnel (1 GiB down and up);
#        d. RSS per idle tunnel (1000 tunnels held), from /proc/PID/status VmRSS;
#      with proxy CPU per request / tunnel from /proc/PID/stat utime+stime deltas (and the
#      kernel's part, stime, on its own);
#   5. measures each proxy's startup (exec -> first accepted TCP connect) and RSS at start
#      (every fresh start in (d) adds a sample).
#
# Names: Squid and cuttle resolve bench.example.com through their own hosts files (Squid's
# `hosts_file`, CUTTLE_HOSTS_FILE). tinyproxy has no such option and /etc/hosts is not touched,
# so tinyproxy is driven with the IP literal 127.0.0.1 (allowed by its filter), which spares it
# the name lookup the other two do.
#
# Nothing leaves the machine: every socket is on 127.0.0.1, cuttle's DNS servers point at a
# closed loopback port, Squid's at 127.0.0.1. Every process started here is stopped by PID on
# exit (trap). Ports are BENCH_PORT_BASE+{28,29,81,82,83,88} (default base 18000: below the
# ephemeral range, so parallel tests that bind port 0 do not collide).
#
# Knobs (environment): BENCH_RUNS=3 BENCH_SECS=3 BENCH_CONNS=64 BENCH_BULK_BYTES=1073741824
# BENCH_IDLE_TUNNELS=1000 BENCH_PORT_BASE=18000 BENCH_SKIP_BUILD=1 BENCH_KEEP_TMP=1.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-3}
CONNS=${BENCH_CONNS:-64}
BULK_BYTES=${BENCH_BULK_BYTES:-1073741824}
IDLE_TUNNELS=${BENCH_IDLE_TUNNELS:-1000}
BASE=${BENCH_PORT_BASE:-18000}

P_SQUID=$((BASE + 28))
P_CUTTLE=$((BASE + 29))
P_HTTP=$((BASE + 81))
P_ECHO=$((BASE + 82))
P_SINK=$((BASE + 83))
P_TINY=$((BASE + 88))
NAME=bench.example.com
LO=127.0.0.1

CUTTLE=$ROOT/target/release/cuttle
HELPERS_TARGET=$ROOT/target/bench-origin
ORIGIN=$HELPERS_TARGET/release/origin
LOADGEN=$HELPERS_TARGET/release/loadgen
TICK=$(getconf CLK_TCK)

log() { printf '%s\n' "$*" >&2; }
die() {
    log "peers.sh: $*"
    exit 1
}

# === processes ===

TMP=$(mktemp -d /tmp/cuttle-peers.XXXXXX)
# Squid drops to the `proxy` user and tinyproxy to `nobody`: both write their logs here.
chmod 777 "$TMP"
PIDS=()

# Stops one of our children (TERM, then KILL after 5 s) and forgets its PID, so that a PID
# reused later by someone else is never signalled.
stop_pid() {
    local pid=$1 keep=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    while ((${#PIDS[@]})); do
        stop_pid "${PIDS[0]}"
    done
    if [[ -n ${BENCH_KEEP_TMP:-} ]]; then
        log "peers.sh: kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/$LO/$1") 2>/dev/null; }

# Microseconds since the epoch, from bash's own clock (no fork).
now_us() {
    local t=${EPOCHREALTIME/./}
    echo "$t"
}

# Waits until $1 (port) accepts; prints the epoch µs of the first accepted connect.
wait_port() {
    "$LOADGEN" wait-port --to "$LO:$1" --timeout-ms "${2:-10000}" | sed -n 's/^RESULT epoch_us=//p'
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# utime+stime of a process (all its threads) in clock ticks; the command name is skipped.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
# "utime+stime stime": the total and the kernel's part.
cpu_split() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13, $13}'; }

# Value of key $2 in a `RESULT k=v ...` line $1.
field() { sed -n "s/.*[ ]$2=\([^ ]*\).*/\1/p" <<<" $1"; }

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

# === setup ===

T_START=$(now_us)
need=()
command -v squid >/dev/null || [[ -x /usr/sbin/squid ]] || need+=(squid)
command -v tinyproxy >/dev/null || [[ -x /usr/bin/tinyproxy ]] || need+=(tinyproxy)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    log "peers.sh: installing ${need[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
SQUID=$(command -v squid || echo /usr/sbin/squid)
TINYPROXY=$(command -v tinyproxy || echo /usr/bin/tinyproxy)

if [[ -z ${BENCH_SKIP_BUILD:-} ]]; then
    log "peers.sh: building cuttle (release) and bench/origin"
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin cuttle
    cargo build --release --quiet --manifest-path "$ROOT/bench/origin/Cargo.toml" \
        --target-dir "$HELPERS_TARGET"
fi
[[ -x $CUTTLE && -x $ORIGIN && -x $LOADGEN ]] || die "missing binaries (build first)"
T_BUILT=$(now_us)

for p in $P_SQUID $P_CUTTLE $P_HTTP $P_ECHO $P_SINK $P_TINY; do
    port_free "$p" || die "port $p is in use (set BENCH_PORT_BASE)"
done
# 1000 idle tunnels hold about 2000 descriptors in a proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

printf '%s %s\n' "$LO" "$NAME" >"$TMP/hosts"

cat >"$TMP/squid.conf" <<EOF
# Equivalent of the Squid egress image's rules, on loopback, with no cache.
http_port $LO:$P_SQUID
visible_hostname cuttle-bench
pid_filename $TMP/squid.pid
cache_log $TMP/squid-cache.log
access_log stdio:/dev/null squid
cache_store_log none
logfile_rotate 0
cache deny all
cache_mem 0 MB
coredump_dir $TMP
hosts_file $TMP/hosts
dns_nameservers $LO
shutdown_lifetime 0 seconds
max_filedescriptors 16384
acl localnet src 127.0.0.0/8
acl SSL_ports port $P_ECHO $P_SINK
acl Safe_ports port 80 443 1025-65535
acl CONNECT method CONNECT
acl allowlist dstdomain .example.com
acl allowlist_ip dst 127.0.0.1/32
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow localnet allowlist
http_access allow localnet allowlist_ip
http_access deny all
EOF

printf '%s\n' '(^|\.)example\.com$' '^127\.0\.0\.1$' >"$TMP/tinyproxy.filter"
cat >"$TMP/tinyproxy.conf" <<EOF
User nobody
Group nogroup
Port $P_TINY
Listen $LO
Timeout 600
MaxClients 4096
Allow $LO
ConnectPort $P_ECHO
ConnectPort $P_SINK
LogFile "/dev/null"
LogLevel Info
PidFile "$TMP/tinyproxy.pid"
Filter "$TMP/tinyproxy.filter"
FilterType ere
FilterDefaultDeny Yes
EOF

cuttle_env=(
    env -i "PATH=$PATH"
    "CUTTLE_LISTEN=$LO:$P_CUTTLE"
    "CUTTLE_HOSTS_FILE=$TMP/hosts"
    "SQUID_WHITELIST=.example.com,127.0.0.1"
    "CUTTLE_UPSTREAM_ALLOW_CIDRS=127.0.0.0/8"
    "CUTTLE_CONNECT_PORTS=$P_ECHO,$P_SINK"
    "CUTTLE_DNS_SERVERS=$LO:9"
    "CUTTLE_ACCESS_LOG=squid"
    "CUTTLE_LOG=warn"
    "SHUTDOWN_LIFETIME=1"
)

"$ORIGIN" "$LO:$P_HTTP" &
PIDS+=($!)
"$ORIGIN" --tcp "$LO:$P_ECHO" &
PIDS+=($!)
"$ORIGIN" --sink "$LO:$P_SINK" &
PIDS+=($!)
for p in $P_HTTP $P_ECHO $P_SINK; do
    wait_port "$p" >/dev/null || die "origin on port $p did not start"
done

declare -A PID
declare -A VALS # "metric target" -> space-separated per-run values
add() { VALS["$1 $2"]="${VALS["$1 $2"]:-} $3"; }

# Starts proxy $1 (fresh process); records its PID, and as samples its startup time (exec to
# the first accepted TCP connect) and its RSS at start.
start_proxy() {
    local name=$1 t0 t1 pid
    t0=$(now_us)
    case $name in
    squid) "$SQUID" -N -f "$TMP/squid.conf" >/dev/null 2>>"$TMP/squid.err" & ;;
    tinyproxy) "$TINYPROXY" -d -c "$TMP/tinyproxy.conf" >/dev/null 2>>"$TMP/tinyproxy.err" & ;;
    # stdout is the access log: written as in production, and thrown away.
    cuttle) "${cuttle_env[@]}" "$CUTTLE" >/dev/null 2>>"$TMP/cuttle.err" & ;;
    esac
    pid=$!
    PIDS+=("$pid")
    t1=$(wait_port "$(proxy_port "$name")") || die "$name did not start (see $TMP/$name.err)"
    PID[$name]=$pid
    add startup "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", (b - a) / 1000}')"
    sleep 0.2
    add rss_start "$name" "$(awk -v k="$(rss_kib "$pid")" 'BEGIN {printf "%.2f", k / 1024}')"
}

TARGETS=(direct squid tinyproxy cuttle)
proxy_port() {
    case $1 in
    squid) echo "$P_SQUID" ;;
    tinyproxy) echo "$P_TINY" ;;
    cuttle) echo "$P_CUTTLE" ;;
    esac
}
# The destination name each proxy is asked for (tinyproxy: the IP literal, see the header).
dest_host() { if [[ $1 == tinyproxy ]]; then echo "$LO"; else echo "$NAME"; fi; }

for t in squid tinyproxy cuttle; do
    start_proxy "$t"
done

cat >"$TMP/wrk.lua" <<'EOF'
wrk.path = os.getenv("WRK_PATH")
wrk.headers["Host"] = os.getenv("WRK_HOST")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d io_errors=%d status_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
EOF

# Runs a command against target $1, measuring the proxy's CPU; prints
# "RESULT... cpu_ticks=N sys_ticks=M" (M: the part spent in the kernel).
measured() {
    local target=$1 out c0=0 c1=0 s0=0 s1=0
    shift
    [[ $target != direct ]] && read -r c0 s0 < <(cpu_split "${PID[$target]}")
    out=$("$@") || {
        log "peers.sh: $target: command failed: $*"
        echo "RESULT failed=1"
        return 0
    }
    [[ $target != direct ]] && read -r c1 s1 < <(cpu_split "${PID[$target]}")
    echo "$out cpu_ticks=$((c1 - c0)) sys_ticks=$((s1 - s0))"
}

wrk_run() {
    local target=$1 secs=$2 url host path
    if [[ $target == direct ]]; then
        url="http://$LO:$P_HTTP/" path=/ host="$LO:$P_HTTP"
    else
        host="$(dest_host "$target"):$P_HTTP"
        url="http://$LO:$(proxy_port "$target")/" path="http://$host/"
    fi
    WRK_PATH=$path WRK_HOST=$host measured "$target" \
        wrk -t2 -c"$CONNS" -d"${secs}s" -s "$TMP/wrk.lua" "$url" | grep '^RESULT'
}

connect_run() {
    local target=$1 secs=$2 host=${3:-}
    if [[ $target == direct ]]; then
        measured direct "$LOADGEN" connect --to "$LO:$P_ECHO" --workers "$CONNS" --secs "$secs"
    else
        host=${host:-$(dest_host "$target")}
        measured "$target" "$LOADGEN" connect --to "$LO:$(proxy_port "$target")" \
            --connect "$host:$P_ECHO" --workers "$CONNS" --secs "$secs"
    fi
}

bulk_run() {
    local target=$1 dir=$2
    if [[ $target == direct ]]; then
        measured direct "$LOADGEN" bulk --to "$LO:$P_SINK" --dir "$dir" --bytes "$BULK_BYTES"
    else
        measured "$target" "$LOADGEN" bulk --to "$LO:$(proxy_port "$target")" \
            --connect "$(dest_host "$target"):$P_SINK" --dir "$dir" --bytes "$BULK_BYTES"
    fi
}

idle_run() {
    local target=$1
    "$LOADGEN" idle --to "$LO:$(proxy_port "$target")" --connect "$(dest_host "$target"):$P_ECHO" \
        --pid "${PID[$target]}" --count "$IDLE_TUNNELS" --settle-ms 500 || echo "RESULT failed=1"
}

warn_errors() {
    local what=$1 target=$2 line=$3 k v
    for k in io_errors status_errors errors failed; do
        # tinyproxy closes the client connection after every response; wrk counts each close.
        [[ $target == tinyproxy && $k == io_errors ]] && continue
        v=$(field "$line" "$k")
        if [[ -n $v && $v != 0 ]]; then
            log "peers.sh: warning: $what via $target: $k=$v ($line)"
        fi
    done
}

# Other work on the machine skews every number: measure it (all cores, over one second).
cpu_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat; }
read -r b0 i0 < <(cpu_busy)
sleep 1
read -r b1 i1 < <(cpu_busy)
BUSY_BEFORE=$(awk -v b=$((b1 - b0)) -v i=$((i1 - i0)) 'BEGIN {printf "%.0f", 100 * b / (b + i)}')
# CPU ticks of this script, its waited-for children (wrk, loadgen, stopped proxies) and the
# processes it still runs: subtracted from the machine's, what is left is other people's work.
our_ticks() {
    local t p
    t=$(sed 's/^.*) //' "/proc/$$/stat" | awk '{print $12 + $13 + $14 + $15}')
    for p in "${PIDS[@]}"; do
        [[ -r /proc/$p/stat ]] && t=$((t + $(cpu_ticks "$p")))
    done
    echo "$t"
}
read -r mb0 mi0 < <(cpu_busy)
ours0=$(our_ticks)
T_RUN=$(now_us)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# (a) plain HTTP: a short warm-up per target (and a check that each path answers 200).
log "peers.sh: (a) plain HTTP, wrk -c$CONNS, ${SECS}s x $RUNS"
for t in "${TARGETS[@]}"; do
    line=$(wrk_run "$t" 1)
    warn_errors "warm-up" "$t" "$line"
done
for _ in $(seq "$RUNS"); do
    for t in "${TARGETS[@]}"; do
        line=$(wrk_run "$t" "$SECS")
        warn_errors "plain HTTP" "$t" "$line"
        req=$(field "$line" requests) dur=$(field "$line" duration_us)
        [[ -n $req && -n $dur ]] || continue
        add rps "$t" "$(awk -v r="$req" -v d="$dur" 'BEGIN {printf "%.0f", r / (d / 1e6)}')"
        add p99 "$t" "$(awk -v v="$(field "$line" p99_us)" 'BEGIN {printf "%.2f", v / 1000}')"
        [[ $t != direct ]] && add cpu_req "$t" \
            "$(awk -v c="$(field "$line" cpu_ticks)" -v r="$req" -v k="$TICK" 'BEGIN {printf "%.1f", c / k * 1e6 / r}')"
        [[ $t != direct ]] && add sys_req "$t" \
            "$(awk -v c="$(field "$line" sys_ticks)" -v r="$req" -v k="$TICK" 'BEGIN {printf "%.1f", c / k * 1e6 / r}')"
    done
done

# (b) CONNECT tunnels/s.
log "peers.sh: (b) CONNECT tunnels, $CONNS workers, ${SECS}s x $RUNS"
for t in "${TARGETS[@]}"; do
    line=$(connect_run "$t" 0.5)
    warn_errors "warm-up" "$t" "$line"
done
for _ in $(seq "$RUNS"); do
    for t in "${TARGETS[@]}" cuttle_ip; do
        if [[ $t == cuttle_ip ]]; then
            line=$(connect_run cuttle "$SECS" "$LO")
        else
            line=$(connect_run "$t" "$SECS")
        fi
        warn_errors "CONNECT" "$t" "$line"
        ok=$(field "$line" ok)
        [[ -n $ok && $ok != 0 ]] || continue
        add tps "$t" "$(field "$line" rate)"
        [[ $t != direct ]] && add cpu_tun "$t" \
            "$(awk -v c="$(field "$line" cpu_ticks)" -v r="$ok" -v k="$TICK" 'BEGIN {printf "%.1f", c / k * 1e6 / r}')"
        [[ $t != direct ]] && add sys_tun "$t" \
            "$(awk -v c="$(field "$line" sys_ticks)" -v r="$ok" -v k="$TICK" 'BEGIN {printf "%.1f", c / k * 1e6 / r}')"
    done
done

# (c) bulk through one tunnel.
log "peers.sh: (c) bulk, $BULK_BYTES bytes down and up x $RUNS"
for _ in $(seq "$RUNS"); do
    for dir in down up; do
        for t in "${TARGETS[@]}"; do
            line=$(bulk_run "$t" "$dir")
            warn_errors "bulk $dir" "$t" "$line"
            mbps=$(field "$line" mbps)
            [[ -n $mbps ]] || continue
            add "bulk_$dir" "$t" "$mbps"
            [[ $t != direct ]] && add "cpu_gib_$dir" "$t" \
                "$(awk -v c="$(field "$line" cpu_ticks)" -v b="$BULK_BYTES" -v k="$TICK" 'BEGIN {printf "%.0f", c / k * 1000 / (b / 1073741824)}')"
        done
    done
done

# (d) RSS per idle tunnel, each run on a fresh process: after the workloads above, allocators
# and thread-stack caches hold enough freed memory to hide what a tunnel costs. A short light
# warm-up (8 workers, 0.3 s) first, so one-time initialisation is not counted per tunnel.
# Each fresh start also adds a startup-time and RSS-at-start sample.
log "peers.sh: (d) $IDLE_TUNNELS idle tunnels x $RUNS, fresh processes"
for _ in $(seq "$RUNS"); do
    for t in squid tinyproxy cuttle; do
        stop_pid "${PID[$t]}"
        start_proxy "$t"
        "$LOADGEN" connect --to "$LO:$(proxy_port "$t")" --connect "$(dest_host "$t"):$P_ECHO" \
            --workers 8 --secs 0.3 >/dev/null || true
        line=$(idle_run "$t" | grep '^RESULT' || true)
        warn_errors "idle" "$t" "$line"
        per=$(field "$line" per_tunnel_kib)
        [[ -n $per ]] && add idle_kib "$t" "$per"
    done
done
T_END=$(now_us)
read -r mb1 mi1 < <(cpu_busy)
ours1=$(our_ticks)
OTHER_DURING=$(awk -v b=$((mb1 - mb0)) -v i=$((mi1 - mi0)) -v o=$((ours1 - ours0)) \
    'BEGIN {v = 100 * (b - o) / (b + i); printf "%.0f", v < 0 ? 0 : v}')

# === report ===

med() {
    local -a v
    read -ra v <<<"${VALS["$1 $2"]:-}"
    median "${v[@]}"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || b + 0 == 0) print "-"; else printf "%.2f×", a / b}'; }
# check VALUE OP LIMIT -> yes/no
check() { awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN {if (v == "nan" || v == "-" || l == "nan") {print "?"; exit} ok = (op == ">=") ? (v + 0 >= l + 0) : (v + 0 <= l + 0); print ok ? "**met**" : "missed"}'; }
fmt() { awk -v v="$1" -v d="${2:-0}" 'BEGIN {if (v == "nan" || v == "") print "-"; else printf "%.*f", d, v}'; }

row() { # label metric decimals target-text target-check
    local label=$1 m=$2 d=$3 tgt=$4 ok=$5
    local dv sv tv cv
    dv=$(med "$m" direct) sv=$(med "$m" squid) tv=$(med "$m" tinyproxy) cv=$(med "$m" cuttle)
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
        "$(fmt "$dv" "$d")" "$(fmt "$sv" "$d")" "$(fmt "$tv" "$d")" "$(fmt "$cv" "$d")" \
        "$(ratio "$cv" "$dv")" "$(ratio "$cv" "$sv")" "$(ratio "$cv" "$tv")" "$tgt ${ok:+($ok)}"
}

sq() { med "$1" squid; }
tp() { med "$1" tinyproxy; }
cu() { med "$1" cuttle; }
di() { med "$1" direct; }
half() { awk -v v="$1" -v f="$2" 'BEGIN {print (v == "nan") ? "nan" : v * f}'; }

CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
echo
echo "## cuttle vs Squid vs tinyproxy ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "Machine: $(nproc) cores ($CPU_MODEL), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r);" \
    "$("$SQUID" -v | head -1 | sed 's/Squid Cache: Version/Squid/'), $("$TINYPROXY" -v 2>&1 | head -1), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)," \
    "cuttle $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo '+dirty')."
echo "Other work on the machine: ${BUSY_BEFORE}% of its CPU just before the workloads, ${OTHER_DURING}% during them (load average before: $LOAD_BEFORE); above ~10% the ratios are unreliable, run again on a quiet machine. Median of $RUNS runs; ${SECS}s per throughput run, $CONNS connections / workers; no CPU pinning (load generator, origin and proxy share the cores)."
echo
echo "| workload | direct | Squid | tinyproxy | cuttle | cuttle ÷ direct | cuttle ÷ Squid | cuttle ÷ tinyproxy | target |"
echo "|---|---|---|---|---|---|---|---|---|"
row "plain HTTP req/s (wrk, keep-alive, absolute-form)" rps 0 "≥ 3× Squid" "$(check "$(cu rps)" ">=" "$(half "$(sq rps)" 3)")"
row "plain HTTP p99 latency, ms" p99 2 "≤ 0.5× Squid" "$(check "$(cu p99)" "<=" "$(half "$(sq p99)" 0.5)")"
row "proxy CPU per plain request, µs" cpu_req 1 "≤ 1/3 Squid" "$(check "$(cu cpu_req)" "<=" "$(half "$(sq cpu_req)" 0.3333)")"
row "… of which in the kernel (system time), µs" sys_req 1 "" ""
c1=$(check "$(cu tps)" ">=" "$(half "$(sq tps)" 2)") c2=$(check "$(cu tps)" ">=" "$(half "$(tp tps)" 1.3)")
row "CONNECT tunnels/s (connect, ClientHello + 64 B echo, close)" tps 0 "≥ 2× Squid, ≥ 1.3× tinyproxy" "$c1, $c2"
row "proxy CPU per tunnel, µs" cpu_tun 1 "≤ 1/3 Squid" "$(check "$(cu cpu_tun)" "<=" "$(half "$(sq cpu_tun)" 0.3333)")"
row "… of which in the kernel (system time), µs" sys_tun 1 "" ""
b1=$(check "$(cu bulk_down)" ">=" "$(half "$(di bulk_down)" 0.8)") b2=$(check "$(cu bulk_down)" ">=" "$(half "$(sq bulk_down)" 2)")
row "bulk through one tunnel, download, MB/s" bulk_down 0 "≥ 0.8× direct, ≥ 2× Squid" "$b1, $b2"
b1=$(check "$(cu bulk_up)" ">=" "$(half "$(di bulk_up)" 0.8)") b2=$(check "$(cu bulk_up)" ">=" "$(half "$(sq bulk_up)" 2)")
row "bulk through one tunnel, upload, MB/s" bulk_up 0 "≥ 0.8× direct, ≥ 2× Squid" "$b1, $b2"
row "proxy CPU per GiB tunnelled (download), ms" cpu_gib_down 0 "" ""
row "proxy CPU per GiB tunnelled (upload), ms" cpu_gib_up 0 "" ""
row "RSS per idle tunnel ($IDLE_TUNNELS held), KiB" idle_kib 1 "≤ 4 KiB" "$(check "$(cu idle_kib)" "<=" 4)"
row "RSS at start, MiB" rss_start 1 "≤ 8 MiB" "$(check "$(cu rss_start)" "<=" 8)"
row "startup to accepting connections, ms" startup 1 "≤ 50 ms" "$(check "$(cu startup)" "<=" 50)"
echo
echo "cuttle CONNECT tunnels/s with an IP-literal destination (127.0.0.1, no hosts-file lookup): $(fmt "$(med tps cuttle_ip)") (by name: $(fmt "$(cu tps)"); CPU per tunnel $(fmt "$(med cpu_tun cuttle_ip)" 1) µs)."
if [[ $(awk -v c="$(cu tps)" -v d="$(di tps)" 'BEGIN {print (c != "nan" && d != "nan" && c + 0 >= 0.95 * d) ? 1 : 0}') == 1 ]]; then
    echo "cuttle's tunnels/s reached the direct rate: the load generator, on the same cores, is the limit of that row (direct pays its connect and close too), so cuttle's ratio to Squid there is a lower bound, and its CPU per tunnel is measured below saturation, where wake-ups batch less."
fi
echo "tinyproxy is driven with the IP literal 127.0.0.1 (it has no hosts_file option); Squid and cuttle resolve bench.example.com from their hosts files. Startup and RSS at start: median over the $((RUNS + 1)) starts of each proxy."
echo "Every tunnel starts with a TLS ClientHello naming the CONNECT host (cuttle's SNI check, on by default, runs); the echo origin returns it, the sink skips it."
echo "tinyproxy closes the client connection after each response, so under wrk it serves one request per connection (wrk reconnects)."
echo "RSS per idle tunnel: each run on a fresh process after a light warm-up; (VmRSS with the tunnels open - VmRSS before) / tunnels."
echo "Squid, tinyproxy and cuttle all log every request (to /dev/null). Per-run values: BENCH_KEEP_TMP=1 keeps $TMP."
echo
awk -v s="$T_START" -v b="$T_BUILT" -v r="$T_RUN" -v e="$T_END" \
    'BEGIN {printf "Timing: install+build %.0f s, setup %.1f s, workloads %.0f s, total %.0f s.\n", (b-s)/1e6, (r-b)/1e6, (e-r)/1e6, (e-s)/1e6}'
if [[ -n ${BENCH_KEEP_TMP:-} ]]; then
    for k in "${!VALS[@]}"; do echo "$k:${VALS[$k]}"; done | sort >"$TMP/values.txt"
fi
