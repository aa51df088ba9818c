#!/bin/sh
# glidein_startup.sh: the glidein (pilot job) a gwms factory submits to a batch site.
#
# It downloads the glidein files over plain HTTP from the factory's web server, checks each one by
# hash against a description whose own SHA-256 came with the submission (the trusted channel),
# runs the validation scripts, writes the startd's configuration and runs gwms-startd until the
# startd exits or the batch system tells the glidein to stop.
#
# A VO frontend may add its own validation scripts (and files they use), as in glideinWMS: with
# -client_web and -client_descript (which the factory passes on from the frontend's authenticated
# request) the glidein also fetches the frontend's description and files, checked the same way,
# into client/ (apart from the factory's), and runs the frontend's validate scripts after the
# factory's. A frontend's description may list only validate and file entries: the trust anchors
# (ca), the Python (wheel) and the entry's attributes (attrs) are the factory's alone.
#
# POSIX sh on purpose: it must run under whatever /bin/sh a worker node has (dash on Debian,
# busybox, bash), before anything of ours is installed there. So: no arrays, no `local`, printf
# instead of echo for data (dash's echo interprets backslashes), and the few tools it needs
# have fallbacks (curl, wget or Python to fetch; sha*sum, openssl or Python to hash).

usage() {
    if [ -n "$1" ]; then printf 'gwms glidein: %s\n' "$1" >&2; fi
    cat >&2 <<'USAGE'
usage: glidein_startup.sh -web URL -descript SHA256 -entry NAME -factory NAME -client NAME
           -name ID -collectors HOST:PORT[,HOST:PORT...] -trusted IDENTITY [-trusted IDENTITY...]
           -credential PATH -lifetime SECONDS [-retire SECONDS] [-idle SECONDS]
           [-credential_margin SECONDS] [-failure_backoff SECONDS] [-listen HOST]
           [-python PATH] [-workdir DIR] [-client_web URL -client_descript SHA256]
           [-batch_time_limit SECONDS] [-http_proxy URL]
USAGE
    exit 2
}

die() {
    printf 'gwms glidein: %s\n' "$*" >&2
    exit 1
}

say() {
    printf 'gwms glidein: %s\n' "$*"
}

nl='
'

# ---------------------------------------------------------------------------------------------
# Options (glideinWMS style: single dash, each with a value)

web= descript= entry= factory= client= name= collectors= credential= lifetime= retire=
idle=1200 margin=300 backoff=0 listen=127.0.0.1 python=python3 workdir=
batch_time_limit= http_proxy_url=
trusted= client_web= client_descript= client_web_given= client_descript_given=
while [ $# -gt 0 ]; do
    opt=$1
    case $opt in
        -web|-descript|-entry|-factory|-client|-name|-collectors|-trusted|-credential|-lifetime|\
        -retire|-idle|-credential_margin|-failure_backoff|-listen|-python|-workdir|\
        -client_web|-client_descript|-batch_time_limit|-http_proxy) ;;
        *) usage "unknown option: $opt" ;;
    esac
    [ $# -ge 2 ] || usage "option $opt needs a value"
    value=$2
    # glidein_config holds one KEY=VALUE per line: a newline in a value would forge settings.
    case $value in *"$nl"*) usage "the value of $opt contains a newline" ;; esac
    case $opt in
        -web) web=$value ;;
        -descript) descript=$value ;;
        -entry) entry=$value ;;
        -factory) factory=$value ;;
        -client) client=$value ;;
        -name) name=$value ;;
        -collectors) collectors=$value ;;
        -trusted) trusted=$trusted$value$nl ;;
        -credential) credential=$value ;;
        -lifetime) lifetime=$value ;;
        -retire) retire=$value ;;
        -idle) idle=$value ;;
        -credential_margin) margin=$value ;;
        -failure_backoff) backoff=$value ;;
        -listen) listen=$value ;;
        -python) python=$value ;;
        -workdir) workdir=$value ;;
        -client_web) client_web=$value client_web_given=1 ;;
        -client_descript) client_descript=$value client_descript_given=1 ;;
        -batch_time_limit) batch_time_limit=$value ;;
        -http_proxy) http_proxy_url=$value ;;
    esac
    shift 2
done

for required in web descript entry factory client name collectors credential lifetime; do
    eval "value=\$$required"
    [ -n "$value" ] || usage "missing required option -$required"
done
[ -n "$trusted" ] || usage "missing required option -trusted (the identities allowed to claim this glidein)"

# Whole seconds, no sign, no leading zero (sh arithmetic would read 010 as octal).
is_count() {
    case $1 in ''|*[!0-9]*|0?*) return 1 ;; esac
    return 0
}
is_count "$lifetime" && [ "$lifetime" -gt 0 ] || usage "-lifetime must be a positive whole number of seconds, got '$lifetime'"
# A batch system's time limit (the plugin that set it passes it): the glidein ends before the
# batch system kills it, leaving the startd time to give its jobs back and the glidein time to
# clean up: a tenth of the limit, at least 15 s, at most 5 minutes.
if [ -n "$batch_time_limit" ]; then
    is_count "$batch_time_limit" && [ "$batch_time_limit" -gt 0 ] \
        || usage "-batch_time_limit must be a positive whole number of seconds, got '$batch_time_limit'"
    stop_margin=$((batch_time_limit / 10))
    [ "$stop_margin" -ge 15 ] || stop_margin=15
    [ "$stop_margin" -le 300 ] || stop_margin=300
    limit_lifetime=$((batch_time_limit - stop_margin))
    [ "$limit_lifetime" -gt 0 ] || usage "-batch_time_limit $batch_time_limit leaves no time to run (15 s are kept to stop)"
    if [ "$limit_lifetime" -lt "$lifetime" ]; then
        lifetime=$limit_lifetime
        if [ -n "$retire" ] && [ "$retire" -gt $((lifetime - lifetime / 10)) ]; then retire=; fi
    fi
fi
[ -n "$retire" ] || retire=$((lifetime - lifetime / 10))
for pair in "retire:$retire" "idle:$idle" "credential_margin:$margin" "failure_backoff:$backoff"; do
    is_count "${pair#*:}" || usage "-${pair%%:*} must be a whole number of seconds, got '${pair#*:}'"
done
# The hash names a file in a URL: exactly 64 lowercase hex digits, nothing else.
check_sha256_option() {  # OPTION VALUE
    case $2 in *[!0-9a-f]*) usage "$1 must be a SHA-256 in lowercase hex, got '$2'" ;; esac
    [ ${#2} -eq 64 ] || usage "$1 must be a SHA-256 in lowercase hex (64 digits), got '$2'"
}
check_sha256_option -descript "$descript"
web=${web%/}
# The frontend's files: both options or neither.
if [ -n "$client_web_given" ] && [ -z "$client_descript_given" ]; then
    usage "missing option -client_descript (-client_web and -client_descript go together)"
fi
if [ -n "$client_descript_given" ] && [ -z "$client_web_given" ]; then
    usage "missing option -client_web (-client_web and -client_descript go together)"
fi
if [ -n "$client_web_given" ]; then
    # It comes from the frontend, through the factory: an http(s) URL, never something a
    # fetcher could take for one of its options.
    case $client_web in
        http://?*|https://?*) ;;
        *) usage "-client_web must be an http:// or https:// URL, got '$client_web'" ;;
    esac
    check_sha256_option -client_descript "$client_descript"
    client_web=${client_web%/}
fi

# The entry's HTTP proxy (a Squid near the workers) for the glidein's own downloads: the
# files are content-addressed, so the cache may keep them. curl, wget and Python all read
# http_proxy; no_proxy is cleared so that a site-wide bypass list does not skip the cache.
if [ -n "$http_proxy_url" ]; then
    case $http_proxy_url in
        http://?*) ;;
        *) usage "-http_proxy must be an http:// URL, got '$http_proxy_url'" ;;
    esac
    http_proxy=$http_proxy_url no_proxy= NO_PROXY=
    export http_proxy no_proxy NO_PROXY
fi

here=$(pwd) || die "cannot tell the current directory"
workdir=${workdir:-$here}
case $workdir in /*) ;; *) workdir=$here/$workdir ;; esac
case $credential in /*) ;; *) credential=$here/$credential ;; esac
[ -r "$credential" ] || die "cannot read the credential $credential"
found=$(command -v "$python") || die "no Python: $python is not found"
python=$found

# ---------------------------------------------------------------------------------------------
# a. The glide directory, removed whatever happens

glide_dir=
startd_pid=
starting=
sleep_pid=
interrupted=
stop_sent=

cleanup() {
    if [ -n "$glide_dir" ] && [ -d "$glide_dir" ]; then
        rm -rf "$glide_dir"
    fi
}

on_signal() {
    interrupted=$1
    if [ -n "$startd_pid" ] || [ -n "$starting" ]; then
        # TERM even for INT: a background child of a non-interactive shell ignores SIGINT.
        # The startd evicts its jobs and exits; the main loop waits for it and cleans up.
        if [ -n "$startd_pid" ]; then kill -TERM "$startd_pid" 2>/dev/null; fi
        stop_sent=1
        return
    fi
    if [ -n "$sleep_pid" ]; then kill "$sleep_pid" 2>/dev/null; fi
    printf 'gwms glidein: %s received before the startd started: stopping\n' "$1" >&2
    exit "$2"
}

trap cleanup EXIT
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

[ -d "$workdir" ] || die "the work directory $workdir does not exist"
glide_dir=$(mktemp -d "$workdir/glide_XXXXXX") || die "cannot make a directory under $workdir"
cd "$glide_dir" || die "cannot enter $glide_dir"
config=$glide_dir/glidein_config
mkdir "$glide_dir/files" "$glide_dir/wheels" || die "cannot make directories in $glide_dir"
# The frontend's files in a directory of their own: a name it shares with a factory file
# cannot replace that file.
if [ -n "$client_web" ]; then
    mkdir "$glide_dir/client" "$glide_dir/client/files" || die "cannot make directories in $glide_dir"
fi

start_time=$(date +%s 2>/dev/null)
case $start_time in
    ''|*[!0-9]*) start_time=$("$python" -c 'import time; print(int(time.time()))') ;;
esac

{
    printf '%s=%s\n' \
        GLIDEIN_Name "$name" \
        GLIDEIN_Entry_Name "$entry" \
        GLIDEIN_Factory "$factory" \
        GLIDEIN_Client "$client" \
        GLIDEIN_Collector "$collectors" \
        GLIDEIN_Credential "$credential" \
        GLIDEIN_Lifetime "$lifetime" \
        GLIDEIN_Retire "$retire" \
        GLIDEIN_Max_Idle "$idle" \
        GLIDEIN_Credential_Margin "$margin" \
        GLIDEIN_Listen "$listen" \
        GLIDEIN_Start_Time "$start_time" \
        GLIDEIN_Dir "$glide_dir"
    # One line per identity: a DN may hold spaces, commas, anything but a newline.
    printf '%s' "$trusted" | while IFS= read -r identity; do
        printf 'GLIDEIN_Trusted=%s\n' "$identity"
    done
    # Which frontend files this glidein ran (they reach the slot ad).
    if [ -n "$client_web" ]; then
        printf '%s=%s\n' GLIDEIN_Client_Web "$client_web" GLIDEIN_Client_Description "$client_descript"
    fi
} > "$config" || die "cannot write $config"
say "glidein $name of entry $entry (factory $factory, for $client) in $glide_dir"

# ---------------------------------------------------------------------------------------------
# b. Fetch the description and the files, each checked by hash

# The last resort when the node has neither curl nor wget. urllib honours http_proxy itself.
py_fetch='
import sys, time, urllib.error, urllib.request
url, out = sys.argv[1], sys.argv[2]
# "fresh": past any cache on the way (a proxy then asks the server again).
headers = {"Cache-Control": "no-cache", "Pragma": "no-cache"} if sys.argv[3:] == ["fresh"] else {}
error = None
for attempt in range(3):
    if attempt:
        time.sleep(1)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as reply, \
                open(out, "wb") as f:
            while True:
                chunk = reply.read(65536)
                if not chunk:
                    break
                f.write(chunk)
        sys.exit(0)
    except urllib.error.HTTPError as e:
        error = e
        if e.code < 500:
            break
    except OSError as e:
        error = e
print("%s: %s" % (url, error), file=sys.stderr)
sys.exit(1)
'
py_hash='
import hashlib, sys
h = hashlib.new(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    for chunk in iter(lambda: f.read(65536), b""):
        h.update(chunk)
print(h.hexdigest())
'

if command -v curl >/dev/null 2>&1; then fetcher=curl
elif command -v wget >/dev/null 2>&1; then fetcher=wget
else fetcher=python
fi

fetch() {  # URL FILE [fresh]: with "fresh", past any cache on the way
    case $3 in
        fresh) fresh_curl='-H Cache-Control:no-cache -H Pragma:no-cache' fresh_wget=--no-cache ;;
        *) fresh_curl= fresh_wget= ;;
    esac
    # (the fresh_ options are single words: unquoted on purpose)
    case $fetcher in
        # A transfer slower than 1 byte/s for a minute is a stalled server: give up on it.
        curl) curl -fsS --retry 2 --retry-delay 1 --connect-timeout 30 --speed-time 60 --speed-limit 1 \
                   $fresh_curl -o "$2" "$1" ;;
        wget) wget -q -t 3 -T 60 $fresh_wget -O "$2" "$1" ;;
        python) "$python" -c "$py_fetch" "$1" "$2" $3 ;;
    esac
}

# fetch_checked URL FILE ALGO DIGEST LABEL [NAME]: fetch and check by hash, or die naming the
# file (LABEL in a mismatch, NAME, by default LABEL, when it cannot be fetched).
# Through a proxy, a mismatch may be the cache's: a copy corrupted on its disk, or kept from a
# broken transfer. The glidein says so and fetches once more past the cache (which also makes
# the proxy replace its copy), so that one bad cache entry does not fail every glidein of the
# site; a second mismatch is the file's own and stops the glidein.
fetch_checked() {
    fc_url=$1 fc_file=$2 fc_algo=$3 fc_digest=$4 fc_label=$5 fc_name=${6:-$5}
    fetch "$fc_url" "$fc_file" || die "cannot fetch $fc_name from $fc_url (with $fetcher)"
    got=$(hash_of "$fc_algo" "$fc_file")
    [ "$got" = "$fc_digest" ] && return 0
    [ -n "$http_proxy_url" ] || die "$fc_label: $fc_algo mismatch: expected $fc_digest, got $got"
    printf 'gwms glidein: %s: %s mismatch through the proxy %s (expected %s, got %s): fetching it again past the cache\n' \
        "$fc_label" "$fc_algo" "$http_proxy_url" "$fc_digest" "$got" >&2
    fetch "$fc_url" "$fc_file" fresh || die "cannot fetch $fc_name from $fc_url (with $fetcher)"
    got=$(hash_of "$fc_algo" "$fc_file")
    [ "$got" = "$fc_digest" ] || die "$fc_label: $fc_algo mismatch: expected $fc_digest, got $got"
}

hash_of() {  # ALGO FILE: prints the hex digest
    if command -v "${1}sum" >/dev/null 2>&1; then
        "${1}sum" < "$2" | { read -r digest rest; printf '%s\n' "$digest"; }
    elif command -v openssl >/dev/null 2>&1; then
        openssl dgst "-$1" < "$2" | sed 's/^.*= *//'
    else
        "$python" -c "$py_hash" "$1" "$2"
    fi
}

# fetch_set SIDE WEB HASH DIR KINDS: fetch the description WEB/descriptions/HASH into DIR and
# check it against HASH, then fetch every file it lists from WEB/files/<hexdigest>/<name> into
# DIR/files (wheels into DIR/wheels), check each against the description, and list them as
# "<kind> <name>" lines in DIR/files.list. SIDE starts every message about this set ('' for the
# factory, 'frontend ' for the frontend); KINDS are the kinds the set may hold. The whole
# description is read before any file is fetched: a refused line fetches nothing.
# (POSIX sh has no local variables: the function's own start with fs_.)
fetch_set() {
    fs_side=$1 fs_web=$2 fs_hash=$3 fs_dir=$4 fs_kinds=$5
    fs_what=${fs_side}description
    fetch_checked "$fs_web/descriptions/$fs_hash" "$fs_dir/description" sha256 "$fs_hash" "$fs_what" "the $fs_what"

    # The description is now trusted; the checks below only keep its author's mistake from
    # turning into a path outside the glide directory, and a frontend within its kinds.
    : > "$fs_dir/files.plan"
    line_no=0
    while IFS= read -r line <&3; do
        line_no=$((line_no + 1))
        if [ "$line_no" -eq 1 ]; then
            [ "$line" = "# gwms glidein description 1" ] || die "$fs_what: line 1 is not '# gwms glidein description 1'"
            continue
        fi
        set -f
        # shellcheck disable=SC2086  # splitting the line into its three fields is the point
        set -- $line
        set +f
        [ $# -eq 3 ] || die "$fs_what: line $line_no is not '<algo>:<hexdigest> <kind> <name>'"
        spec=$1 kind=$2 fname=$3
        algo=${spec%%:*} digest=${spec#*:}
        case $algo in sha256|sha1) ;; *) die "$fs_what: line $line_no: unknown hash algorithm '$algo'" ;; esac
        case $digest in ''|*[!0-9a-f]*) die "$fs_what: line $line_no: bad digest '$digest'" ;; esac
        case $fname in ''|.*|*[!A-Za-z0-9._+-]*) die "$fs_what: line $line_no: bad file name '$fname'" ;; esac
        case $kind in
            validate|wheel|ca|attrs|file) ;;
            *) die "$fs_what: line $line_no: unknown kind '$kind'" ;;
        esac
        # (Only the frontend's set is restricted, hence the wording.)
        case " $fs_kinds " in
            *" $kind "*) ;;
            *) die "$fs_what: line $line_no: $kind $fname refused: a frontend may send only" \
                   "validate scripts and files; the trust anchors (ca), the Python (wheel) and the" \
                   "entry's attributes (attrs) are the factory's alone" ;;
        esac
        printf '%s %s %s %s\n' "$algo" "$digest" "$kind" "$fname" >> "$fs_dir/files.plan"
    done 3< "$fs_dir/description"

    : > "$fs_dir/files.list"
    fs_count=0
    while read -r algo digest kind fname <&3; do
        case $kind in
            wheel) dest=$fs_dir/wheels/$fname ;;
            *) dest=$fs_dir/files/$fname ;;
        esac
        if [ -n "$fs_side" ]; then fs_label="${fs_side}file $fname"; else fs_label=$fname; fi
        # Two lines of one name: the second would replace a file already checked.
        [ ! -e "$dest" ] || die "$fs_what: $fname is listed twice"
        fetch_checked "$fs_web/files/$digest/$fname" "$dest" "$algo" "$digest" "$fs_label"
        if [ "$kind" = ca ]; then
            printf 'GLIDEIN_CA_File=%s\n' "$dest" >> "$config"
        fi
        printf '%s %s\n' "$kind" "$fname" >> "$fs_dir/files.list"
        fs_count=$((fs_count + 1))
    done 3< "$fs_dir/files.plan"
    say "fetched and checked $fs_count ${fs_side}file(s) from $fs_web (with $fetcher)"
}

fetch_set '' "$web" "$descript" "$glide_dir" "validate wheel ca attrs file"
# The frontend's set only once the factory's is all there and checked.
if [ -n "$client_web" ]; then
    fetch_set 'frontend ' "$client_web" "$client_descript" "$glide_dir/client" "validate file"
fi

# ---------------------------------------------------------------------------------------------
# c. Entry attributes

# KEY=VALUE lines on stdin go to glidein_config; anything else is ignored. The settings that
# decide whom the startd trusts and where it reports (and the record of which frontend files
# ran) come from the command line only.
append_settings() {  # WHAT
    while IFS= read -r setting || [ -n "$setting" ]; do
        key=${setting%%=*}
        [ "$key" != "$setting" ] || continue
        case $key in
            ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;;
            GLIDEIN_Trusted|GLIDEIN_Credential|GLIDEIN_CA_File|GLIDEIN_Collector|GLIDEIN_Dir|\
            GLIDEIN_Client_Web|GLIDEIN_Client_Description)
                printf 'gwms glidein: %s may not set %s: ignored\n' "$1" "$key" >&2
                continue ;;
        esac
        printf '%s\n' "$setting" >> "$config"
    done
}

has_wheels=
while read -r kind fname <&3; do
    case $kind in
        attrs) append_settings "attrs file $fname" < "$glide_dir/files/$fname" ;;
        wheel) has_wheels=1 ;;
    esac
done 3< "$glide_dir/files.list"

# ---------------------------------------------------------------------------------------------
# d. The Python the startd runs with

if [ -n "$has_wheels" ]; then
    "$python" -m venv "$glide_dir/venv" > "$glide_dir/venv.log" 2>&1 \
        || { cat "$glide_dir/venv.log" >&2; die "cannot make a virtual environment with $python"; }
    # Only the wheels just checked by hash: no index, and none of the node's pip settings
    # (a site's find-links or index could otherwise slip other packages in).
    (
        unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_REQUIRE_VIRTUALENV
        PIP_CONFIG_FILE=/dev/null
        export PIP_CONFIG_FILE
        exec "$glide_dir/venv/bin/python" -m pip install --quiet --no-index --no-cache-dir \
            --disable-pip-version-check --only-binary=:all: --find-links "$glide_dir/wheels" gwms
    ) > "$glide_dir/pip.log" 2>&1 \
        || { tail -n 20 "$glide_dir/pip.log" >&2; die "cannot install gwms from the wheels"; }
    python=$glide_dir/venv/bin/python
    say "installed gwms from the wheelhouse into $glide_dir/venv"
else
    "$python" -c 'import gwms' 2>/dev/null \
        || die "$python cannot import gwms (and the description lists no wheels to install it from)"
fi
GLIDEIN_PYTHON=$python
export GLIDEIN_PYTHON

# ---------------------------------------------------------------------------------------------
# e. Validation scripts, in the order listed

fail_validation() {
    printf 'gwms glidein: %s\n' "$1" >&2
    # Keep a broken node from taking the batch system's next job at once (a black hole).
    if [ "$backoff" -gt 0 ]; then
        sleep "$backoff" &
        sleep_pid=$!
        wait "$sleep_pid"
        sleep_pid=
    fi
    exit 1
}

# run_validations SIDE DIR: the validate scripts of DIR/files.list (in DIR/files), in order. Their
# KEY=VALUE stdout lines go to glidein_config; the first failure ends the glidein.
run_validations() {
    rv_side=$1 rv_dir=$2
    while read -r kind fname <&3; do
        [ "$kind" = validate ] || continue
        sh "$rv_dir/files/$fname" "$config" < /dev/null > "$glide_dir/validate.out" 2> "$glide_dir/validate.err" 3<&-
        rc=$?
        cat "$glide_dir/validate.err" >&2
        if [ "$rc" -ne 0 ]; then
            last=$(sed '/^[[:space:]]*$/d' "$glide_dir/validate.err" | tail -n 1)
            fail_validation "${rv_side}validation $fname failed: ${last:-exit status $rc}"
        fi
        append_settings "${rv_side}validation $fname" < "$glide_dir/validate.out"
        say "${rv_side}validation $fname passed"
    done 3< "$rv_dir/files.list"
}

run_validations '' "$glide_dir"
# The frontend's after the factory's (the stock ones and the site's): they see everything the
# factory's measured in glidein_config, and cannot stop a factory check from running.
if [ -n "$client_web" ]; then
    run_validations 'frontend ' "$glide_dir/client"
fi

# ---------------------------------------------------------------------------------------------
# f. The startd

"$python" -m gwms.glidein.startd_config "$config" "$glide_dir/startd.toml" \
    || die "cannot write the startd's configuration"

starting=1
"$python" -c 'from twisted.scripts.twistd import run; run()' --nodaemon --pidfile= \
    --logfile "$glide_dir/startd.log" gwms-startd --config "$glide_dir/startd.toml" < /dev/null &
startd_pid=$!
starting=
# A signal that came between starting the startd and knowing its pid: pass it on now.
if [ -n "$interrupted" ]; then kill -TERM "$startd_pid" 2>/dev/null; fi
say "started gwms-startd (pid $startd_pid)"

# wait returns early (status > 128) when a trapped signal arrives; the trap has passed the
# signal on, so wait again for the startd's own status. A shell that already reported the
# status says 127 (unknown pid) to the second wait: keep the first then.
status=
while :; do
    interrupted=
    wait "$startd_pid"
    rc=$?
    if [ "$rc" -eq 127 ] && [ -n "$status" ]; then break; fi
    status=$rc
    [ -n "$interrupted" ] || break
done
startd_pid=
# twistd stops cleanly on TERM and then exits by the same signal (so that its parent can tell
# why): a stop we asked for is a normal end of the glidein.
if [ -n "$stop_sent" ] && [ "$status" -eq 143 ]; then
    say "gwms-startd stopped on TERM"
    status=0
fi

say "gwms-startd exited with status $status; the last 40 lines of its log:"
tail -n 40 "$glide_dir/startd.log" 2>/dev/null
exit "$status"
