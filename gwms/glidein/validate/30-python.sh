#!/bin/sh
# Stock validation: the Python the startd will run with ($GLIDEIN_PYTHON) runs, is 3.11 or
# newer and imports gwms, twisted and classad2. Prints GLIDEIN_Python_Version=3.x.y.

fail() {
    printf 'gwms validate: %s\n' "$*" >&2
    exit 1
}

[ -n "$GLIDEIN_PYTHON" ] || fail "GLIDEIN_PYTHON is not set (glidein_startup.sh sets it)"
version=$("$GLIDEIN_PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) \
    || fail "$GLIDEIN_PYTHON does not run"
"$GLIDEIN_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$GLIDEIN_PYTHON is Python $version, gwms needs 3.11 or newer"
missing=$("$GLIDEIN_PYTHON" -c '
import importlib
missing = []
for module in ("gwms", "twisted", "classad2"):
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(module)
print(", ".join(missing))
' 2>/dev/null) || fail "$GLIDEIN_PYTHON cannot check its modules"
[ -z "$missing" ] || fail "$GLIDEIN_PYTHON (Python $version) cannot import $missing (needed: gwms, twisted, classad2)"
printf 'GLIDEIN_Python_Version=%s\n' "$version"
