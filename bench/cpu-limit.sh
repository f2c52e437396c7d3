#!/bin/sh
# CPU: "10%" through the real binaries: ops-meta's legacy answer gives an installed
# busy-loop agent the limit, ops-updater starts it in its own cgroup, and the agent's
# cgroup CPU time over 10 s is compared with the wall time. Needs root (cgroup v1 cpuacct,
# as on the development machines). Usage: bench/cpu-limit.sh [BIN_DIR] (default
# target/debug; build with `cargo build --bins`).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=${1:-$ROOT/target/debug}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
cd "$D"
mkdir -p work/busy/1.0 tarballs
cat > work/busy/1.0/control <<'CTL'
#!/bin/sh
cd "$(dirname "$0")"
alive() { [ -f app.pid ] && kill -0 "$(cat app.pid)" 2>/dev/null && [ "$(cut -d' ' -f3 /proc/$(cat app.pid)/stat 2>/dev/null)" != Z ]; }
case "$1" in
  start) if alive; then echo started; exit 0; fi
         nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > app.pid; echo started ;;
  stop) [ -f app.pid ] && kill "$(cat app.pid)"; rm -f app.pid; echo stoped ;;
  status) if alive; then echo started; else echo stoped; fi ;;
esac
CTL
chmod +x work/busy/1.0/control
echo 1.0 > work/busy/.version
PARENT=ops-updater-cpubench-$$
cat > meta.json <<JSON
{"tarballDir": "./tarballs", "http": {"enabled": true, "listen": "127.0.0.1:28011"},
 "agents": [{"default": {"name": "busy", "version": "1.0", "tarball": "http://127.0.0.1:28011",
   "md5": "", "cmd": "start", "limits": {"CPU": "10%"}}}]}
JSON
cat > upd.json <<JSON
{"hostname": "cpu-bench", "server": "127.0.0.1:28011", "interval": 2, "protocol": "legacy",
 "workdir": "./work", "firstDelayMaxMs": 100, "cgroupParent": "$PARENT",
 "http": {"enabled": true, "listen": "127.0.0.1:28012"}}
JSON
"$B/ops-meta" -c meta.json > meta.log 2>&1 & M=$!
sleep 1
"$B/ops-updater" -c upd.json > upd.log 2>&1 & U=$!
for i in $(seq 1 100); do [ -f work/busy/1.0/app.pid ] && break; sleep 0.1; done
sleep 2
CG=$(for d in /sys/fs/cgroup/*/"$PARENT"/busy; do [ -f "$d/cpuacct.usage" ] && echo "$d"; done | head -1)
echo "agent process cgroups:"; grep -E 'cpu|memory' "/proc/$(cat work/busy/1.0/app.pid)/cgroup"
a=$(cat "$CG/cpuacct.usage"); t0=$(date +%s%N)
sleep 10
b=$(cat "$CG/cpuacct.usage"); t1=$(date +%s%N)
p=$(( (b - a) * 1000 / (t1 - t0) ))
echo "busy loop under CPU 10%: $(( (b - a) / 1000000 )) ms of CPU in $(( (t1 - t0) / 1000000 )) ms = $((p / 10)).$((p % 10))% of one core"
kill "$U"; sleep 0.5; work/busy/1.0/control stop > /dev/null; kill "$M"
for d in /sys/fs/cgroup/*/"$PARENT"/busy /sys/fs/cgroup/*/"$PARENT"; do rmdir "$d" 2>/dev/null || true; done
