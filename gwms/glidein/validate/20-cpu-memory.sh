#!/bin/sh
# Stock validation: the node's CPUs and memory, and that they cover what the entry promises
# (GLIDEIN_CPUS, GLIDEIN_MaxMemMBs from its attributes, when set). Prints GLIDEIN_Host_CPUS=<n>
# and GLIDEIN_Host_MemMB=<n>.
config=$1

setting() {  # KEY: the last KEY=... line of glidein_config, or nothing
    sed -n "s/^$1=//p" "$config" | tail -n 1
}

fail() {
    printf 'gwms validate: %s\n' "$*" >&2
    exit 1
}

[ -r "$config" ] || fail "cannot read glidein_config '$config'"

# nproc counts the CPUs this process may run on (a batch system's cpuset), which is what a
# job gets; /proc/cpuinfo counts the machine's.
cpus=$(nproc 2>/dev/null)
case $cpus in ''|*[!0-9]*) cpus=$(grep -c '^processor' /proc/cpuinfo 2>/dev/null) ;; esac
case $cpus in ''|*[!0-9]*|0) cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null) ;; esac
case $cpus in ''|*[!0-9]*|0) fail "cannot count the CPUs (no nproc, /proc/cpuinfo or getconf)" ;; esac

mem_kb=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\) kB$/\1/p' /proc/meminfo 2>/dev/null)
case $mem_kb in ''|*[!0-9]*) fail "cannot read the memory size from /proc/meminfo" ;; esac
mem_mb=$((mem_kb / 1024))

want_cpus=$(setting GLIDEIN_CPUS)
if [ -n "$want_cpus" ]; then
    case $want_cpus in *[!0-9]*) fail "GLIDEIN_CPUS must be a whole number, got '$want_cpus'" ;; esac
    [ "$cpus" -ge "$want_cpus" ] || fail "this node has $cpus CPU(s), GLIDEIN_CPUS needs $want_cpus"
fi
want_mem=$(setting GLIDEIN_MaxMemMBs)
if [ -n "$want_mem" ]; then
    case $want_mem in *[!0-9]*) fail "GLIDEIN_MaxMemMBs must be a whole number of MB, got '$want_mem'" ;; esac
    [ "$mem_mb" -ge "$want_mem" ] || fail "this node has $mem_mb MB of memory, GLIDEIN_MaxMemMBs needs $want_mem MB"
fi
printf 'GLIDEIN_Host_CPUS=%s\nGLIDEIN_Host_MemMB=%s\n' "$cpus" "$mem_mb"
