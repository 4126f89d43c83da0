#!/usr/bin/env bash
# Runs a command with its resident memory capped by the OS: a cgroup v1 memory cgroup, or v2's
# memory.max. Usage: .ci/memory_cap.sh MIB COMMAND...
# Exits with the command's status (137: killed by the OS), or 125 if no memory cgroup can be made
# here (an address-space limit is no stand-in: it counts reserved, untouched memory).
set -uo pipefail
mib=$1
shift
bytes=$((mib * 1024 * 1024))
name="fabric-cap-$$"
if [ -w /sys/fs/cgroup/memory ]; then
    dir="/sys/fs/cgroup/memory/$name"
    mkdir "$dir"
    echo "$bytes" >"$dir/memory.limit_in_bytes"
    echo 0 >"$dir/memory.swappiness" 2>/dev/null || true
    how="cgroup v1 memory.limit_in_bytes"
elif [ -w /sys/fs/cgroup/cgroup.subtree_control ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    dir="/sys/fs/cgroup/$name"
    mkdir "$dir"
    echo "$bytes" >"$dir/memory.max"
    echo 0 >"$dir/memory.swap.max" 2>/dev/null || true
    how="cgroup v2 memory.max"
else
    echo "memory cap: no writable memory cgroup on this machine" >&2
    exit 125
fi
echo "memory cap: $mib MiB ($how): $*" >&2
bash -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' _ "$dir" "$@"
status=$?
rmdir "$dir" 2>/dev/null || true
exit $status
