#!/usr/bin/env bash
# Runs a command with its memory capped by the OS: a cgroup v1 memory cgroup (RAM and, where the
# kernel accounts it, RAM + swap), or v2's memory.max with swap off. Usage:
#   .ci/memory_cap.sh MIB COMMAND...
# Started by `fabric run` (mpirun), each process caps itself in a cgroup of its own and, when the
# OS kills it, names its rank and the cause.
# Exits with the command's status (137: killed by the OS), or 125 if this machine cannot cap
# (no memory cgroup to make, or swap that the cap could not cover): an address-space limit is no
# stand-in, it counts reserved, untouched memory.
set -uo pipefail
mib=$1
shift
bytes=$((mib * 1024 * 1024))
name="fabric-cap-$$"
swap_active() { [ "$(wc -l </proc/swaps)" -gt 1 ]; }
skip() {
    echo "memory cap: $1" >&2
    [ -n "${dir:-}" ] && rmdir "$dir" 2>/dev/null
    exit 125
}
dir=""
if [ -w /sys/fs/cgroup/memory ]; then
    mkdir "/sys/fs/cgroup/memory/$name" || skip "cannot make a memory cgroup"
    dir="/sys/fs/cgroup/memory/$name"
    echo "$bytes" >"$dir/memory.limit_in_bytes" || skip "cannot set memory.limit_in_bytes"
    if [ -e "$dir/memory.memsw.limit_in_bytes" ]; then
        echo "$bytes" >"$dir/memory.memsw.limit_in_bytes" || skip "cannot set memory.memsw.limit_in_bytes"
    elif swap_active; then
        skip "swap is on and this kernel does not account it to cgroups"
    fi
    how="cgroup v1 memory.limit_in_bytes"
elif [ -r /sys/fs/cgroup/cgroup.subtree_control ] \
    && grep -qw memory /sys/fs/cgroup/cgroup.subtree_control; then
    mkdir "/sys/fs/cgroup/$name" || skip "cannot make a memory cgroup"
    dir="/sys/fs/cgroup/$name"
    echo "$bytes" >"$dir/memory.max" || skip "cannot set memory.max"
    if ! echo 0 >"$dir/memory.swap.max" 2>/dev/null && swap_active; then
        skip "swap is on and memory.swap.max cannot be set"
    fi
    how="cgroup v2 memory.max"
else
    skip "no writable memory cgroup on this machine"
fi
echo "memory cap: $mib MiB ($how): $*" >&2
bash -c 'echo $$ >"$1/cgroup.procs" || exit 125; shift; exec "$@"' _ "$dir" "$@"
status=$?
# The cgroup's own count of the processes its cap killed.
kills=$(awk '$1 == "oom_kill" { print $2 }' "$dir/memory.oom_control" "$dir/memory.events" 2>/dev/null | head -1)
if [ "$status" -eq 137 ] && [ "${kills:-0}" -gt 0 ]; then
    echo "memory cap: rank ${OMPI_COMM_WORLD_RANK:-0} was killed by the OS: out of memory in its $mib MiB cgroup" >&2
fi
rmdir "$dir" 2>/dev/null || true
exit $status
