"""Glideins over SSH (the ssh grid, BOSCO's way) to a real sshd on 127.0.0.1, as an
unprivileged account: to the remote host itself (remote_batch = "fork") and to its Slurm
(remote_batch = "slurm"). One SSH login serves every command of a factory."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gwms.cli.demo import free_port
from gwms.testing.polling import wait_until

from ssh_server import USER
from test_glideins import history, pool_config, start_pool
from test_slurm import submit

pytestmark = pytest.mark.integration


def ssh_pool_config(workdir: Path, server, python: Path, remote_batch: str, idle: int = 8) -> Path:
    config = pool_config(workdir, entries=False, entry=f"""
[factory.entry.remote]
grid = "ssh"
contact = "{server.contact}"
ssh_key = "{server.client_key}"
ssh_known_hosts = "{server.known_hosts}"
remote_batch = "{remote_batch}"
remote_dir = "glideins"
partition = "debug"
python = "{python}"
attributes = {{ GLIDEIN_Site = "Remote", GLIDEIN_CPUS = 1, GLIDEIN_MaxMemMBs = 512 }}
allowed_frontends = ["/O=gwms/OU=Hosts/CN=localhost"]
max_idle = 2
max_glideins = 2
max_walltime = 3600
max_idle_time = {idle}
failure_backoff = 0
""")
    return config


def ssh_processes(server) -> list[int]:
    """Local ssh processes using the test key (the factory's control master and commands)."""
    needle = str(server.client_key).encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def owned_private(path: Path, uid: int) -> bool:
    st = path.stat()
    return st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600


def test_glideins_over_ssh_to_a_fork_remote_run_jobs_through_one_ssh_connection(
        ssh_server, node_python, tmp_path, start_daemon, gwms_cli):
    logins_before = ssh_server.logins()
    config = ssh_pool_config(tmp_path, ssh_server, node_python, "fork")
    pool = start_pool(start_daemon, config, tmp_path)
    env = {"GWMS_CONFIG": str(config)}
    area = ssh_server.home / "glideins" / "remote"
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 3, "sleep 1; id -un")

    # While they run: each glidein's job script (glidein_startup.sh and the credential) was staged
    # into the remote work area, private to the remote account, and the glidein's credential too.
    def staged() -> list[Path]:
        scripts = list(area.glob("remote-*/job.sh"))
        creds = list(area.glob("remote-*/gwms_glidein_*/credential"))
        return scripts and creds and scripts + creds

    for path in wait_until(staged, 60, "a glidein staged and started in the remote work area"):
        assert owned_private(path, ssh_server.uid), path
    done = wait_until(lambda: (h := history(gwms_cli, env, cluster)) and len(h) == 3 and h, 90,
                      "the jobs to complete in the glideins started over SSH")
    assert sorted((j["ProcId"], j["JobStatus"], j["ExitCode"]) for j in done) == [(i, 4, 0) for i in range(3)]
    assert all(j["RemoteHost"].split("@")[1].startswith("remote-") for j in done), done
    # The jobs ran as the remote account (the glidein's startd runs as it).
    assert {(tmp_path / "jobs" / f"out.{i}").read_text() for i in range(3)} == {f"{USER}\n"}
    # Idle for 8 s, the glideins exit; the factory sees it over SSH and cleans the remote area.
    wait_until(lambda: pool.log_text().count("finished (exit code 0)") >= 1 and not list(area.glob("remote-*")),
               60, "the glideins to exit and their remote directories to be removed")
    # Staging, submitting, every cycle's status and the clean-up: all through one login.
    assert ssh_server.logins() - logins_before == 1
    assert "ssh: connected to " + ssh_server.contact in pool.log_text()
    assert ssh_processes(ssh_server)  # the control master
    pool.stop()
    assert ssh_processes(ssh_server) == []  # the factory closed its connection as it stopped


def test_glideins_over_ssh_to_a_remote_slurm_run_jobs(ssh_server, node_python, slurm, tmp_path, start_daemon,
                                                      gwms_cli):
    logins_before = ssh_server.logins()
    before = set(slurm.jobs())
    config = ssh_pool_config(tmp_path, ssh_server, node_python, "slurm", idle=1200)
    pool = start_pool(start_daemon, config, tmp_path)
    env = {"GWMS_CONFIG": str(config)}
    area = ssh_server.home / "glideins" / "remote"
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 2, "id -un")
    done = wait_until(lambda: (h := history(gwms_cli, env, cluster)) and len(h) == 2 and h, 90,
                      "the jobs to complete in Slurm glideins submitted over SSH")
    assert sorted((j["ProcId"], j["JobStatus"], j["ExitCode"]) for j in done) == [(i, 4, 0) for i in range(2)]
    assert {(tmp_path / "jobs" / f"out.{i}").read_text() for i in range(2)} == {f"{USER}\n"}
    # sbatch ran remotely, as the remote account: Slurm's jobs are the glideins, and theirs.
    glideins = {i: v for i, v in slurm.jobs().items() if v[0].startswith("gwms-remote-") and i not in before}
    names = {v[0] for v in glideins.values()}
    assert {j["RemoteHost"].split("@")[1] for j in done} <= {n[len("gwms-"):] for n in names}
    for job_id in glideins:
        assert f"UserId={USER}(" in slurm.command("scontrol", "show", "job", job_id).stdout
    scripts = list(area.glob("remote-*.sh"))
    assert scripts and all(owned_private(p, ssh_server.uid) for p in scripts)
    # Stopping the pool removes its glideins (scancel over SSH: TERM to each batch shell) and
    # waits for Slurm to say they ended; they end by themselves, so Slurm says COMPLETED.
    pool.stop()
    assert ssh_processes(ssh_server) == []
    states = {slurm.jobs()[i][1] for i in glideins}
    assert states == {"COMPLETED"}, states
    assert ssh_server.logins() - logins_before == 1


def test_a_factory_killed_and_restarted_uses_the_ssh_connection_it_left(ssh_server, node_python, tmp_path,
                                                                        start_daemon, gwms_cli):
    logins_before = ssh_server.logins()
    config = ssh_pool_config(tmp_path, ssh_server, node_python, "fork", idle=30)
    # The pool's collector at a fixed port, as a real pool's is: the glideins find it again.
    port = free_port()
    config.write_text(config.read_text().replace('collectors = ["127.0.0.1:0"]', f'collectors = ["127.0.0.1:{port}"]')
                      .replace('[collector]\nlisten = "127.0.0.1:0"', f'[collector]\nlisten = "127.0.0.1:{port}"'))
    pool = start_pool(start_daemon, config, tmp_path)
    env = {"GWMS_CONFIG": str(config)}
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 1, "sleep 2; id -un")
    # Killed once the factory has recorded what it submitted (a submission cut short counts as
    # idle until it is stale, and would leave the restarted factory nothing to do over SSH).
    wait_until(lambda: "factory: submitted 1 glideins to remote" in pool.log_text(), 60, "a glidein submitted over SSH")
    pool.kill9()
    # The control master runs in a session of its own: it outlives the factory's process group.
    assert ssh_processes(ssh_server)
    restarted = pool.restart()
    wait_until(lambda: gwms_cli("q", "--json", env=env).returncode == 0, 30, "the restarted schedd to answer")
    [job] = wait_until(lambda: history(gwms_cli, env, cluster), 90, "the job to complete after the restart")
    assert (job["JobStatus"], job["ExitCode"]) == (4, 0)
    assert "ssh: using the running connection to " + ssh_server.contact in restarted.log_text()
    assert ssh_server.logins() - logins_before == 1  # no second login, no orphaned master
    restarted.stop()
    assert ssh_processes(ssh_server) == []
