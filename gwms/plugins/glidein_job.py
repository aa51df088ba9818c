"""The job script a batch system runs for one glidein (the ``slurm`` grid, and ``ssh`` to a
remote Slurm or plain host).

It carries glidein_startup.sh and the pilot credential inside itself, so a worker node needs no
file system shared with the factory: the script makes a private directory on the node, writes
the two files there (mode 0600, under umask 077), runs the glidein, forwards the batch system's
TERM to it, and removes the directory whatever happens.

With ``nodes`` > 1 (a multi-node Slurm allocation), the script runs on the allocation's first
node, copies itself to every node with ``sbcast`` and starts one glidein per node with ``srun``,
each with a name of its own (``<glidein id>-n<node>``) and its own output files.
"""

from __future__ import annotations

import secrets
import shlex
from typing import Sequence

from gwms.plugins.grid_local import WAIT_CHILD

# The part every copy runs: make the directory, write the files, run the glidein, clean up.
_BODY = r"""
umask 077
parent={parent}
base=$(mktemp -d "$parent/gwms_glidein_XXXXXX") || {{
    printf 'gwms glidein job: cannot make a directory under %s\n' "$parent" >&2; exit 1; }}
base=$(cd "$base" && pwd)
child=
trap 'rm -rf "$base"{remove_self}' EXIT
# The batch system's TERM (scancel, time limit) goes to glidein_startup.sh, which stops the
# startd (its jobs go back to their schedds) and cleans up.
trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; fi' TERM INT
cat > "$base/glidein_startup.sh" <<'GWMS_STARTUP_{tag}'
{startup}GWMS_STARTUP_{tag}
{credential}sh "$base/glidein_startup.sh" {arguments} {name_option}-workdir "$base" </dev/null &
child=$!
wait_child "$child"
exit "$rc"
"""

_CREDENTIAL = """cat > "$base/credential" <<'GWMS_CREDENTIAL_{tag}'
{text}GWMS_CREDENTIAL_{tag}
"""

# Multi-node: on the first node, copy this script to every node and start one copy per node.
# A TERM for the job (the factory's gentle removal signals the batch shell alone) must reach
# each node's glidein and nothing else: srun itself would abort the step (SIGKILL) and a
# signal to the step reaches the users' jobs too. So each copy writes its pid to a file on its
# node, and the batch shell runs a second, overlapping step that TERMs exactly those pids.
_FAN_OUT = r"""
# (per node name too: test clusters run several nodes on one host)
pid_file={parent}/gwms_glidein_job_${{SLURM_JOB_ID:?not in a Slurm job}}_${{SLURMD_NODENAME:-node}}.pid
copy={parent}/gwms_glidein_job_$SLURM_JOB_ID.sh
case ${{1:-}} in
    --stop) kill -TERM "$(cat "$pid_file")" 2>/dev/null; exit 0 ;;
    --node) ;;
    *)
        sbcast --force "$0" "$copy" || {{ printf 'gwms glidein job: sbcast to %s failed\n' "$copy" >&2; exit 1; }}
        srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=0 --output={output} --error={error} \
            sh "$copy" --node &
        step=$!
        trap 'srun --overlap --nodes={nodes} --ntasks-per-node=1 --output=/dev/null --error=/dev/null \
                  sh "$copy" --stop' TERM INT
        wait_child "$step"
        exit "$rc" ;;
esac
echo "$$" > "$pid_file"
"""


def _text(data: bytes, what: str) -> str:
    """``data`` as here-document text (ends with a newline; the delimiters are random)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} is not text: it cannot travel inside a job script") from None
    if "\0" in text:
        raise ValueError(f"the {what} holds a NUL byte: it cannot travel inside a job script")
    return text if text.endswith("\n") else text + "\n"


def job_script(glidein_id: str, startup: bytes, arguments: Sequence[str], credential: bytes | None,
               parent: str = '"${TMPDIR:-/tmp}"', nodes: int = 1, node_output: tuple[str, str] | None = None
               ) -> str:
    """The job script for one glidein: ``arguments`` are glidein_startup.sh's (without
    -credential and -workdir), ``parent`` the shell word naming the directory on the node under
    which the glidein makes its own (expanded there; quote literal paths with shlex.quote).
    For ``nodes`` > 1, ``node_output`` is srun's (--output, --error) pattern (%n is the node)."""
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    if nodes > 1 and node_output is None:
        raise ValueError("a multi-node glidein needs its per-node output files")
    tag = secrets.token_hex(8)
    args = list(arguments)
    if credential is not None:
        args += ["-credential", '"$base/credential"']
    quoted = " ".join(shlex.quote(a) if a != '"$base/credential"' else a for a in args)
    parts = [f"#!/bin/sh\n# gwms glidein {glidein_id}\n", WAIT_CHILD]
    if nodes > 1:
        assert node_output is not None
        parts.append(_FAN_OUT.format(parent=parent, nodes=nodes, output=shlex.quote(node_output[0]),
                                     error=shlex.quote(node_output[1])))
    parts.append(_BODY.format(
        parent=parent, tag=tag, startup=_text(startup, "glidein start-up script"),
        remove_self=' "$0" "$pid_file"' if nodes > 1 else "",
        credential=_CREDENTIAL.format(tag=tag, text=_text(credential, "credential")) if credential is not None else "",
        arguments=quoted,
        name_option=f'-name {shlex.quote(glidein_id)}-n"$SLURM_NODEID" ' if nodes > 1 else ""))
    return "".join(parts)
