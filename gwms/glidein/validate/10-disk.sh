#!/bin/sh
# Stock validation: enough free disk in the glide directory (jobs' sandboxes go there) and in
# /tmp. Thresholds from glidein_config: GLIDEIN_Min_Disk_MB (default 1000), GLIDEIN_Min_Tmp_MB
# (default 100). Prints GLIDEIN_Disk_Free_MB=<n>.
config=$1

setting() {  # KEY DEFAULT: the last KEY=... line of glidein_config, else DEFAULT
    value=$(sed -n "s/^$1=//p" "$config" | tail -n 1)
    printf '%s\n' "${value:-$2}"
}

whole() {  # NAME VALUE
    case $2 in
        ''|*[!0-9]*) printf 'gwms validate: %s must be a whole number of MB, got %s\n' "$1" "'$2'" >&2; exit 1 ;;
    esac
}

free_mb() {  # DIR: free space for an unprivileged user, in MB (POSIX df -P, 1024-byte blocks)
    df -Pk "$1" 2>/dev/null | sed -n '2p' | {
        read -r fs blocks used avail rest
        case $avail in ''|*[!0-9]*) ;; *) printf '%s\n' "$((avail / 1024))" ;; esac
    }
}

[ -r "$config" ] || { printf 'gwms validate: cannot read glidein_config %s\n' "'$config'" >&2; exit 1; }
glide_dir=$(setting GLIDEIN_Dir "$(dirname "$config")")
min_disk=$(setting GLIDEIN_Min_Disk_MB 1000)
min_tmp=$(setting GLIDEIN_Min_Tmp_MB 100)
whole GLIDEIN_Min_Disk_MB "$min_disk"
whole GLIDEIN_Min_Tmp_MB "$min_tmp"

disk=$(free_mb "$glide_dir")
case $disk in ''|*[!0-9]*) printf 'gwms validate: cannot measure the free space of %s (df -Pk)\n' "$glide_dir" >&2; exit 1 ;; esac
tmp=$(free_mb /tmp)
case $tmp in ''|*[!0-9]*) printf 'gwms validate: cannot measure the free space of /tmp (df -Pk)\n' >&2; exit 1 ;; esac

if [ "$disk" -lt "$min_disk" ]; then
    printf 'gwms validate: %s has %s MB free, GLIDEIN_Min_Disk_MB needs %s MB\n' "$glide_dir" "$disk" "$min_disk" >&2
    exit 1
fi
if [ "$tmp" -lt "$min_tmp" ]; then
    printf 'gwms validate: /tmp has %s MB free, GLIDEIN_Min_Tmp_MB needs %s MB\n' "$tmp" "$min_tmp" >&2
    exit 1
fi
printf 'GLIDEIN_Disk_Free_MB=%s\n' "$disk"
