"""gwms.plugins.glidein_job: the self-contained job script, run for real under /bin/sh with a
fake glidein_startup.sh that reports what it was given."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from gwms.plugins.glidein_job import job_script
from gwms.testing.polling import wait_until

SH = "/bin/sh"  # dash on Debian: the plainest POSIX shell a node may have

# Reports its arguments (one per line: the job script's arguments never hold a newline), the
# credential's mode and bytes, its umask and where it runs; exits with $FAKE_EXIT.
FAKE_STARTUP = rb"""#!/bin/sh
for a in "$@"; do printf 'arg=%s\n' "$a"; done
cred= workdir= prev=
for a in "$@"; do
    case $prev in -credential) cred=$a ;; -workdir) workdir=$a ;; esac
    prev=$a
done
printf 'pwd=%s\n' "$(pwd)"
printf 'umask=%s\n' "$(umask)"
printf 'workdir_mode=%s\n' "$(stat -c %a "$workdir")"
if [ -n "$cred" ]; then
    printf 'cred_mode=%s\n' "$(stat -c %a "$cred")"
    printf '<<CRED\n'; cat "$cred"; printf 'CRED>>\n'
fi
printf 'startup_mode=%s\n' "$(stat -c %a "$0")"
exit "${FAKE_EXIT:-0}"
"""

# A credential with everything a shell or a here-document could stumble on.
CREDENTIAL = (b"-----BEGIN CERTIFICATE-----\nMIIB$x`id`$(touch /tmp/pwned)\\n\n"
              b"GWMS_CREDENTIAL_x\nGWMS_STARTUP_x\nEOF\n'\"\n\t  leading space\n-----END CERTIFICATE-----\n")

ODD_ARGUMENTS = ["-name", "glidein 1", "-trusted", "/O=gwms/CN=it's \"quoted\"", "-web", "http://h/$HOME/`id`",
                 "-entry", "back\\slash \\n", "-x", "*", "-empty", "", "-semi", "a; rm -rf /", "-dash", "-"]


class Run:
    def __init__(self, done: subprocess.CompletedProcess[bytes]) -> None:
        self.code = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr.decode(errors="replace")
        text = done.stdout.decode(errors="replace")
        self.args = [line[4:] for line in text.splitlines() if line.startswith("arg=")]
        self.info = dict(line.split("=", 1) for line in text.splitlines()
                         if "=" in line and not line.startswith("arg=") and line.split("=", 1)[0].isidentifier())

    @property
    def credential(self) -> bytes:
        start = self.stdout.index(b"<<CRED\n") + len(b"<<CRED\n")
        return self.stdout[start:self.stdout.index(b"CRED>>\n", start)]

    @property
    def workdir(self) -> Path:
        return Path(self.args[self.args.index("-workdir") + 1])


def run_script(text: str, tmp_path: Path, *, cwd: Path | None = None, **env: str) -> Run:
    path = tmp_path / "job.sh"
    path.write_text(text)
    tmpdir = tmp_path / "node-tmp"
    tmpdir.mkdir(exist_ok=True)
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmpdir), **env}
    done = subprocess.run([SH, str(path)], check=False, capture_output=True, env=environ, cwd=cwd or tmp_path,
                          stdin=subprocess.DEVNULL, timeout=30)
    return Run(done)


def leftovers(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "node-tmp").iterdir())


def test_arguments_and_credential_arrive_intact_and_everything_is_removed(tmp_path):
    text = job_script("g1", FAKE_STARTUP, ODD_ARGUMENTS, CREDENTIAL)

    run = run_script(text, tmp_path)

    assert run.code == 0, run.stderr
    workdir = run.workdir
    assert workdir.parent == tmp_path / "node-tmp"
    assert workdir.name.startswith("gwms_glidein_")
    assert run.args == [*ODD_ARGUMENTS, "-credential", f"{workdir}/credential", "-workdir", str(workdir)]
    assert run.credential == CREDENTIAL
    assert run.info["cred_mode"] == "600"
    assert run.info["startup_mode"] == "600"
    assert run.info["workdir_mode"] == "700"
    assert run.info["umask"] == "0077"
    assert run.info["pwd"] == str(tmp_path)
    assert not Path("/tmp/pwned").exists()
    assert leftovers(tmp_path) == []
    assert run.stderr == ""


def test_the_jobs_exit_code_is_the_glideins_and_its_directory_goes_anyway(tmp_path):
    run = run_script(job_script("g1", FAKE_STARTUP, ["-v"], CREDENTIAL), tmp_path, FAKE_EXIT="3")
    assert run.code == 3
    assert run.credential == CREDENTIAL  # it did run
    assert leftovers(tmp_path) == []


def test_without_a_credential_there_is_no_credential_option_or_file(tmp_path):
    run = run_script(job_script("g1", FAKE_STARTUP, ["-a", "b"], None), tmp_path)
    assert run.code == 0, run.stderr
    assert run.args == ["-a", "b", "-workdir", str(run.workdir)]
    assert "cred_mode" not in run.info
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("credential,arrives", [
    (b"token-without-newline", b"token-without-newline\n"),
    (b"line\nlast line without newline", b"line\nlast line without newline\n"),
    (b"GWMS_CREDENTIAL_x", b"GWMS_CREDENTIAL_x\n"),
    (b"\n\n", b"\n\n"),
    ("caf\u00e9 \u2603\n".encode(), "caf\u00e9 \u2603\n".encode()),
])
def test_awkward_credentials_survive(tmp_path, credential, arrives):
    # A here-document ends its text with a newline: one is added when the credential has none
    # (token and PEM readers ignore it).
    run = run_script(job_script("g1", FAKE_STARTUP, [], credential), tmp_path)
    assert run.code == 0, run.stderr
    assert run.credential == arrives
    assert leftovers(tmp_path) == []


def test_the_here_document_delimiters_are_random(tmp_path):
    a = job_script("g1", FAKE_STARTUP, [], CREDENTIAL)
    b = job_script("g1", FAKE_STARTUP, [], CREDENTIAL)
    assert a != b
    tag = a.split("<<'GWMS_CREDENTIAL_", 1)[1].split("'", 1)[0]
    assert len(tag) == 16 and int(tag, 16) >= 0


def test_a_literal_parent_directory_is_used(tmp_path):
    parent = tmp_path / "scratch dir $HOME"
    parent.mkdir()
    run = run_script(job_script("g1", FAKE_STARTUP, [], CREDENTIAL, parent=shlex.quote(str(parent))), tmp_path)
    assert run.code == 0, run.stderr
    assert run.workdir.parent == parent
    assert list(parent.iterdir()) == []


def test_a_parent_that_cannot_hold_the_directory_fails_the_job(tmp_path):
    missing = tmp_path / "no-such-dir"
    run = run_script(job_script("g1", FAKE_STARTUP, [], CREDENTIAL, parent=shlex.quote(str(missing))), tmp_path)
    assert run.code == 1
    assert f"gwms glidein job: cannot make a directory under {missing}" in run.stderr
    assert run.args == []  # the glidein never started


@pytest.mark.parametrize("what,kwargs,named", [
    ("credential", {"credential": b"\xff\xfe not utf-8"}, "credential"),
    ("credential", {"credential": b"with a \0 NUL"}, "credential"),
    ("startup", {"startup": b"#!/bin/sh\n\xff\n"}, "glidein start-up script"),
    ("startup", {"startup": b"#!/bin/sh\n\0\n"}, "glidein start-up script"),
])
def test_binary_content_cannot_travel_in_the_script(what, kwargs, named):
    args = {"startup": FAKE_STARTUP, "credential": CREDENTIAL, **kwargs}
    with pytest.raises(ValueError, match=f"the {named} "):
        job_script("g1", args["startup"], [], args["credential"])


def test_nodes_must_be_at_least_one():
    with pytest.raises(ValueError, match="nodes must be at least 1, got 0"):
        job_script("g1", FAKE_STARTUP, [], CREDENTIAL, nodes=0)


def test_several_nodes_need_their_output_files():
    with pytest.raises(ValueError, match="per-node output"):
        job_script("g1", FAKE_STARTUP, [], CREDENTIAL, nodes=2)


def test_a_multi_node_script_copies_itself_and_starts_one_glidein_per_node():
    text = job_script("g1", FAKE_STARTUP, ["-name", "g1"], CREDENTIAL, nodes=3,
                      node_output=("/f/out dir/g1.node%n.out", "/f/out dir/g1.node%n.err"))
    assert 'sbcast --force "$0" "$copy"' in text
    assert ("srun --nodes=3 --ntasks-per-node=1 --kill-on-bad-exit=0 "
            "--output='/f/out dir/g1.node%n.out' --error='/f/out dir/g1.node%n.err'") in text
    assert '-name g1-n"$SLURM_NODEID" -workdir "$base"' in text
    assert 'rm -rf "$base" "$0" "$pid_file"' in text  # each node's copy removes itself and its pid file
    # A TERM to the batch shell reaches each node's glidein through an overlapping step that
    # signals the pid each copy recorded, not through srun (which would abort the step).
    assert 'echo "$$" > "$pid_file"' in text
    assert ("trap 'srun --overlap --nodes=3 --ntasks-per-node=1 --output=/dev/null --error=/dev/null") in text
    assert '--stop) kill -TERM "$(cat "$pid_file")"' in text


FAKE_SBCAST = """#!/bin/sh
[ "$1" = --force ] || exit 9
printf '%s\\n' "$*" >> "$SLURM_LOG"
cp "$2" "$3"
"""

# Runs the command once per node, one after the other; every node but the first gets a copy
# of its own of the broadcast script (on a real allocation each node has its own file).
FAKE_SRUN = """#!/bin/sh
printf 'srun %s\\n' "$*" >> "$SLURM_LOG"
nodes=1
while [ $# -gt 0 ]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; --*) ;; *) break ;; esac
    shift
done
[ "$1" = sh ] && [ "$3" = --node ] || exit 9
copy=$2 node=1
while [ $node -lt $nodes ]; do cp "$copy" "$copy.node$node"; node=$((node + 1)); done
rc=0 node=0
while [ $node -lt $nodes ]; do
    if [ $node -eq 0 ]; then script=$copy; else script=$copy.node$node; fi
    SLURM_NODEID=$node sh "$script" --node || rc=$?
    node=$((node + 1))
done
exit $rc
"""


def test_a_multi_node_script_runs_one_glidein_per_node_with_a_name_each(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbcast", FAKE_SBCAST), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    text = job_script("g1", FAKE_STARTUP, ["-name", "g1", "-v", "a b"], CREDENTIAL, nodes=2,
                      node_output=(f"{tmp_path}/g1.node%n.out", f"{tmp_path}/g1.node%n.err"))

    run = run_script(text, tmp_path, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                     SLURM_JOB_ID="4711", SLURM_LOG=str(log))

    assert run.code == 0, run.stderr
    copy = tmp_path / "node-tmp" / "gwms_glidein_job_4711.sh"
    assert log.read_text().splitlines() == [
        f"--force {tmp_path}/job.sh {copy}",
        (f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=0 --output={tmp_path}/g1.node%n.out "
         f"--error={tmp_path}/g1.node%n.err sh {copy} --node")]
    # Two glideins: the factory's -name, then the node's own (the later one counts).
    names = [run.args[i + 1] for i, a in enumerate(run.args) if a == "-name"]
    assert names == ["g1", "g1-n0", "g1", "g1-n1"]
    assert run.args.count("a b") == 2
    assert run.stdout.count(b"<<CRED\n" + CREDENTIAL + b"CRED>>\n") == 2
    assert leftovers(tmp_path) == []  # the private directories and every node's copy


def test_a_multi_node_script_outside_slurm_refuses_to_run(tmp_path):
    text = job_script("g1", FAKE_STARTUP, [], CREDENTIAL, nodes=2, node_output=("o%n", "e%n"))
    run = run_script(text, tmp_path)
    assert run.code != 0
    assert "not in a Slurm job" in run.stderr
    assert run.args == []


TRAPPING_STARTUP = rb"""#!/bin/sh
sleep 30 &
sleeper=$!
trap 'kill "$sleeper"; echo "TERM received" > "$MARKER"; exit 0' TERM
echo started > "$STARTED"
wait "$sleeper"
echo "no TERM came" > "$MARKER"
exit 5
"""


def test_term_to_the_job_reaches_the_glidein_and_the_directory_goes(tmp_path):
    path = tmp_path / "job.sh"
    path.write_text(job_script("g1", TRAPPING_STARTUP, [], CREDENTIAL))
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    marker, started = tmp_path / "marker", tmp_path / "started"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(node_tmp), "MARKER": str(marker),
           "STARTED": str(started)}
    job = subprocess.Popen([SH, str(path)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: started.exists() or job.poll() is not None, 10, "the fake glidein to start")
        assert job.poll() is None, job.communicate()
        assert len(list(node_tmp.iterdir())) == 1

        job.send_signal(signal.SIGTERM)  # to the job script alone, as scancel's first signal
        _, err = job.communicate(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    assert marker.read_text() == "TERM received\n"
    assert job.returncode == 0, err  # the glidein's exit code
    assert list(node_tmp.iterdir()) == []


def test_the_script_is_plain_posix_sh(tmp_path):
    text = job_script("g1", FAKE_STARTUP, ODD_ARGUMENTS, CREDENTIAL, nodes=2, node_output=("o%n", "e%n"))
    path = tmp_path / "job.sh"
    path.write_text(text)
    assert text.startswith("#!/bin/sh\n# gwms glidein g1\n")
    done = subprocess.run([SH, "-n", str(path)], check=False, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
