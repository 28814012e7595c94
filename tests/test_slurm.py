"""The workflow on a real single-node SLURM cluster, submitted through profiles/slurm.

Needs root and Debian's SLURM packages (installed with apt-get when missing); skipped, with
the reason, where neither is possible or another cluster already runs on this machine. Every
daemon the test starts is stopped by process id, and /etc/slurm/slurm.conf is put back.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
UNAVAILABLE = 77  # cluster.sh: SLURM cannot run here

# Test-only settings on top of the real profile: the loopback cluster's partition, no
# accounting daemon (so squeue for status, pitfall 1), fast polling, and no retries (an
# injected failure fails every attempt; each attempt costs a job start on two CPUs).
TEST_OVERRIDES = [
    "--jobs", "2",
    "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=10",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--latency-wait", "5",
    "--retries", "0",
]


def _alive(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster needs root (daemons, /etc/slurm/slurm.conf)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    conf_before = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)],
        capture_output=True, text=True, timeout=600,
    )
    if started.returncode == UNAVAILABLE:
        pytest.skip(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, f"cluster.sh start failed:\n{started.stderr}"
    daemons = [line.split() for line in (state / "started.pids").read_text().splitlines()]
    try:
        yield state
    finally:
        stopped = subprocess.run(
            ["bash", str(CLUSTER), "stop", str(state)],
            capture_output=True, text=True, timeout=300,
        )
        assert stopped.returncode == 0, f"cluster.sh stop failed:\n{stopped.stderr}"
        still_running = [(name, pid) for name, pid in daemons if _alive(int(pid), name)]
        assert not still_running, f"daemons left running: {still_running}"
        conf_after = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
        assert conf_after == conf_before, "/etc/slurm/slurm.conf was not put back"


def _workdir_with_config(tmp_path: Path) -> tuple[Path, Path, dict]:
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text())
    config["data_dir"] = str(REPO / "tests" / "data" / "corpus")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir, config_file, config


def _snakemake(workdir: Path, config_file: Path, *extra: str, limit_s: int, env_extra=None):
    """One bounded run; SIGINT first, because Snakemake ignores SIGTERM while jobs run."""
    env = {k: v for k, v in os.environ.items() if k != "FAIRLM_FAIL_RUN"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env_extra or {}))
    snakemake = Path(sys.executable).with_name("snakemake")
    command = [
        "timeout", "-s", "INT", "-k", "30", str(limit_s),
        str(snakemake), "--profile", str(REPO / "profiles" / "slurm"),
        "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(config_file),
        *TEST_OVERRIDES, *extra,
    ]
    # Its own process group (id = pid of `timeout`), so that an interrupted test can stop
    # Snakemake, and the jobs it runs here, by that id: a SIGINT to pytest does not reach them.
    with subprocess.Popen(command, cwd=REPO, env=env, text=True, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            stdout, stderr = proc.communicate()
        except BaseException:
            _interrupt_group(proc)
            raise
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert done.returncode not in (124, 137), f"snakemake ran past {limit_s} s:\n" + _tail(done)
    return done


def _interrupt_group(proc: subprocess.Popen) -> None:
    """SIGINT lets Snakemake cancel its SLURM jobs; SIGKILL after 60 s if it has not ended."""
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group has ended
        try:
            proc.communicate(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(done, lines: int = 60) -> str:
    return "\n".join((done.stdout + done.stderr).splitlines()[-lines:])


def _submitted_train_jobs(done) -> list[str]:
    """(SLURM job id, wildcards) of every train job Snakemake submitted, retries included."""
    log = done.stdout + done.stderr
    return re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*"
                      r"/rule_train/([^/]+)/", log)


def _runs(config: dict) -> list[str]:
    grid = config["grid"]
    return [f"{m}/L{n}/seed{s}" for m in grid["models"] for n in grid["seq_lens"]
            for s in grid["seeds"]]


def _job_ids(workdir: Path, runs: list[str]) -> dict[str, str | None]:
    ids = {}
    for run in runs:
        system = workdir / "results" / "runs" / run / "system.json"
        ids[run] = json.loads(system.read_text())["slurm_job_id"] if system.exists() else None
    return ids


def test_workflow_on_slurm_reruns_only_the_failed_seed(slurm_cluster, tmp_path):
    workdir, config_file, config = _workdir_with_config(tmp_path)
    runs = _runs(config)
    failed = runs[-1]

    first = _snakemake(workdir, config_file, "all", limit_s=300,
                       env_extra={"FAIRLM_FAIL_RUN": failed})
    assert first.returncode != 0, "the injected failure went unnoticed:\n" + _tail(first)
    first_ids = _job_ids(workdir, runs)
    assert first_ids[failed] is None, "the failed run wrote its outputs"
    failure_log = (workdir / "logs" / "train" / f"{failed}.log").read_text()
    assert "failure injected" in failure_log, failure_log[-2000:]
    # keep-going: every run was submitted once, and each one that finished recorded the id
    # of the SLURM job it ran in
    submitted = _submitted_train_jobs(first)
    job_of_run = {wildcards: job_id for job_id, wildcards in submitted}
    assert len(submitted) == len(runs), submitted
    assert sorted(job_of_run) == sorted(map(_wildcards, runs)), submitted
    for run in runs:
        if run != failed:
            assert first_ids[run] == job_of_run[_wildcards(run)], f"{run}\n" + _tail(first)

    second = _snakemake(workdir, config_file, "all", limit_s=200)
    assert second.returncode == 0, _tail(second)
    submitted = _submitted_train_jobs(second)
    assert [wildcards for _, wildcards in submitted] == [_wildcards(failed)], submitted
    second_ids = _job_ids(workdir, runs)
    assert second_ids[failed] == submitted[0][0], "system.json does not carry the job's id"
    assert int(second_ids[failed]) > max(int(i) for i in first_ids.values() if i)
    assert {r: second_ids[r] for r in runs if r != failed} == {
        r: first_ids[r] for r in runs if r != failed
    }, "a run that had succeeded was trained again"

    for run in runs:
        for name in ("metrics.parquet", "summary.json", "config.json", "system.json"):
            assert (workdir / "results" / "runs" / run / name).is_file(), f"{run}/{name}"
    for path in ("paper/appendix.tex", "results/audit/fairness.json"):
        assert (workdir / path).is_file(), path
    # mtime only: the appendix records the command line, so its params differ on every call
    nothing_left = _snakemake(workdir, config_file, "all", "--dry-run", "--rerun-triggers",
                              "mtime", limit_s=60)
    assert nothing_left.returncode == 0, _tail(nothing_left)
    assert "Nothing to be done" in nothing_left.stdout + nothing_left.stderr, _tail(nothing_left)


def _wildcards(run: str) -> str:
    """How the plugin names a job's log folder: its wildcard values joined by "_"."""
    model, length, seed = run.split("/")
    return f"{model}_{length.removeprefix('L')}_{seed.removeprefix('seed')}"
