"""The SLURM launcher, mostly against a real SLURM: munged, slurmctld and slurmd on localhost.

A job of the tiny config trains with 2 ranks (one per task, gloo); jobs stopped mid-run by
``scontrol requeue``, by a preempting job of a higher-priority partition and by the
time-limit signal (scancel --signal=TERM, the path where the job requeues itself) resume
from their checkpoint and end with exactly the weights of an uninterrupted run. A few fast
tests check what each task derives from its SLURM environment and the submission plan.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY, tiny_config
from slurm_local import LocalSlurm
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.cluster import submit as launcher
from ssgan_dist.cluster.job import bind_metrics_to_node, export_rank_env, node_address
from ssgan_dist.distributed.env import _launcher_ranks, setup
from ssgan_dist.train import Trainer

STEPS = 60  # long enough that a signal sent at step 20 lands mid-run, short enough for CI
JOB_ARGS = [*TINY, "train.log_every=10", "train.threads=1"]
TIME = ["--time", "5"]  # the local partitions have no limit, which the submitter will not guess


def _install_slurm() -> None:
    if all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        pytest.skip("slurm-wlm and munge are missing, and installing them needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM for the session; SLURM_CONF is set for every command the tests and
    the launcher run, and the daemons are stopped by PID at the end."""
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        yield cluster
    cluster.stop()


def _squeue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return out.split("\n") if out.strip() else []


def _launch(run_dir: Path, shards: Path, *args: str, tasks: int = 2) -> tuple[Any, launcher.Submission]:
    """Submit through the launcher's own functions, without waiting."""
    parsed = launcher.parse_args(["--config", "demo", "--tasks-per-node", str(tasks), "--run-dir", str(run_dir),
                                  *TIME, *args, *JOB_ARGS, f"data.shards={shards}"])
    cfg = launcher.resolve_config(parsed)
    sub = launcher.plan(parsed, cfg)
    return launcher.submit(sub, cfg), sub


def _wait_for_log(path: Path, pattern: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout_s} s")


def _final_state(run_dir: Path) -> dict[str, Any]:
    return ckpt.load(ckpt.list_checkpoints(run_dir)[-1])


def _assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal weights, optimizer and scaler states, step and per-rank data positions."""
    assert a["step"] == b["step"]
    assert [r["data"] for r in a["ranks"]] == [r["data"] for r in b["ranks"]]
    for key in ("G", "D"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for key in ("opt_g", "opt_d"):
        for pid, slots in a[key]["state"].items():
            for slot, value in slots.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[key]["state"][pid][slot])), f"{key}[{pid}].{slot}"


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards32, tmp_path_factory) -> dict[str, Any]:
    """The final state of a 2-rank run of STEPS steps that nothing stopped."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    job, sub = _launch(run_dir, shards32, f"train.max_steps={STEPS}")
    assert launcher.wait(job, sub, poll_s=0.5) == 0
    return _final_state(run_dir)


def _read_when_written(path: Path, into: list[Any], timeout_s: float = 120) -> threading.Thread:
    """Reads ``path`` (JSON) in the background as soon as it appears."""
    def poll() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not into:
            try:
                into.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # not there yet, or caught mid-replace
                time.sleep(0.05)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_two_task_cpu_job_trains_and_finishes(slurm, shards32, tmp_path, capsys):
    """Both ranks train and finish; their exporters bind the node's address, listed in file_sd."""
    run_dir, targets = tmp_path / "run", tmp_path / "targets"
    seen: list[Any] = []
    reader = _read_when_written(targets / "ssgan.json", seen)
    code = launcher.main(["--config", "demo", "--tasks-per-node", "2", "--run-dir", str(run_dir), "--wait", *TIME,
                          *JOB_ARGS, f"data.shards={shards32}", "train.max_steps=4", "metrics.enabled=true",
                          "metrics.port=0", f"metrics.file_sd={targets}/", "metrics.linger_s=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    reader.join()
    host = node_address()
    assert [(g["labels"]["job"], g["labels"]["rank"]) for g in seen[0]] == [("ssgan", "0"), ("ssgan", "1")]
    assert all(g["targets"][0].startswith(f"{host}:") for g in seen[0]), seen
    assert not (targets / "ssgan.json").exists()  # withdrawn when the run finished
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"run dir:   {run_dir}" in out and f"{run_dir}/slurm/{job_id}_<task>_log" in out
    assert "COMPLETED" in out
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt-000000004.pt"]
    assert "rank 0 of 2 on" in (run_dir / "train.log").read_text()
    for task in (0, 1):  # both ranks ran, and finished through submitit
        assert "Job completed successfully" in (run_dir / "slurm" / f"{job_id}_{task}_log.err").read_text()


def _requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=True)


def _preempt(job_id: str) -> None:
    """A job of the higher-priority partition that needs the CPUs the training holds."""
    subprocess.run(["sbatch", "--partition=urgent", f"--cpus-per-task={len(os.sched_getaffinity(0))}", "--output=/dev/null",
                    "--wrap=sleep 1"], check=True, capture_output=True)


def _time_limit_signal(job_id: str) -> None:
    """What SLURM sends ahead of the time limit (--signal=TERM@...): the job requeues itself."""
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [_requeue, _preempt, _time_limit_signal],
                         ids=["scontrol-requeue", "preemption", "time-limit-signal"])
def test_stopped_job_resumes_exactly(slurm, shards32, tmp_path, uninterrupted, interrupt):
    run_dir = tmp_path / "run"
    job, sub = _launch(run_dir, shards32, f"train.max_steps={STEPS}")
    _wait_for_log(run_dir / "train.log", r"step 20/")
    t_signal = time.time()
    interrupt(job.job_id)
    _wait_for_log(run_dir / "train.log", r"resumed from .* at step \d+")
    latency = time.time() - t_signal
    assert launcher.wait(job, sub, poll_s=0.5) == 0
    log = (run_dir / "train.log").read_text()
    stopped_at = int(re.search(r"stop requested: leaving at step (\d+)", log).group(1))
    assert 20 <= stopped_at < STEPS
    assert f"resumed from {run_dir}/ckpt-{stopped_at:09d}.pt at step {stopped_at}" in log
    _assert_same_training_state(_final_state(run_dir), uninterrupted)
    print(f"{interrupt.__name__}: stopped at step {stopped_at}, resumed {latency:.1f} s after the signal")


@pytest.mark.slow
def test_requeues_stop_at_max_requeues(slurm, shards32, tmp_path, capsys):
    """--max-requeues 0: the signal still checkpoints, but the job ends instead of requeueing."""
    run_dir = tmp_path / "run"
    job, sub = _launch(run_dir, shards32, "--max-requeues", "0", f"train.max_steps={STEPS}", tasks=1)
    _wait_for_log(run_dir / "train.log", r"step 20/")
    _time_limit_signal(job.job_id)
    assert launcher.wait(job, sub, poll_s=0.5) == 1
    stopped_at = int(re.search(r"stop requested: leaving at step (\d+)", (run_dir / "train.log").read_text()).group(1))
    assert ckpt.list_checkpoints(run_dir)[-1].name == f"ckpt-{stopped_at:09d}.pt"
    assert "RequeueLimit: not requeued: already requeued 0 times (--max-requeues 0)" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_prints_the_sbatch_script(slurm, tmp_path, capsys):
    code = launcher.main(["--config", "demo", "--nodes", "3", "--gpus-per-node", "4", "--time", "90",
                          "--partition", "gpu", "--run-dir", str(tmp_path / "run"), "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=90", "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=TERM@",
                 "export SUBMITIT_PREEMPT_SIGNAL=TERM", f"{tmp_path / 'run'}/slurm/%j_%t_log.out"):
        assert line in script, line
    assert not (tmp_path / "run").exists() and _squeue() == []


@pytest.mark.slow
def test_bad_config_is_refused_before_submitting(slurm, tmp_path, capsys):
    code = launcher.main(["--config", "demo", "--run-dir", str(tmp_path / "run"), "train.max_stepz=5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config error: train.max_stepz: unknown key" in err
    assert _squeue() == [] and not (tmp_path / "run").exists()


# -- fast: what a task derives from SLURM, and the submission plan -----------------------


def test_task_of_a_multi_node_job_gets_torchrun_variables(monkeypatch):
    """Rank 9 of 2 nodes x 8 tasks: submitit's view wins over stale variables of the submitting shell."""
    import submitit

    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08]",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                 "SLURM_NODEID": "1", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "stale"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    export_rank_env(submitit.JobEnvironment())
    assert _launcher_ranks() == (9, 16, 1)
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == "16234"


def test_metrics_bind_to_the_node_not_loopback():
    loopback = {"metrics": {"addr": "127.0.0.1"}}
    bind_metrics_to_node(loopback)
    assert loopback["metrics"]["addr"] == node_address()
    chosen = {"metrics": {"addr": "10.1.2.3"}}
    bind_metrics_to_node(chosen)
    assert chosen["metrics"]["addr"] == "10.1.2.3"


def test_plan_defaults(tmp_path):
    gpu = launcher.parse_args(["--gpus-per-node", "8", "--run-dir", str(tmp_path), "data.num_workers=3",
                               "metrics.enabled=true"])
    cfg = launcher.resolve_config(gpu)
    sub = launcher.plan(gpu, cfg)
    assert sub.parameters["ntasks_per_node"] == 8 and sub.parameters["gpus_per_node"] == 8
    assert sub.parameters["cpus_per_task"] == 4 and sub.folder == tmp_path / "slurm"
    assert cfg.metrics.file_sd == f"{launcher.MONITORING_TARGETS}/"
    cpu = launcher.parse_args(["--nodes", "2", "--run-dir", "relative/run"])
    cpu_sub = launcher.plan(cpu, launcher.resolve_config(cpu))
    assert cpu_sub.tasks == 2 and "gpus_per_node" not in cpu_sub.parameters
    assert cpu_sub.folder == Path.cwd() / "relative/run/slurm"


def test_rendezvous_port_is_outside_the_ephemeral_range_and_torchruns_defaults():
    from ssgan_dist.distributed.env import SLURM_PORT_SPAN, slurm_master_port

    ports = [slurm_master_port(str(job)) for job in range(10_000_000, 10_000_000 + SLURM_PORT_SPAN)]
    assert len(set(ports)) == SLURM_PORT_SPAN  # consecutive jobs never share a port
    assert 1024 < min(ports) and max(ports) < 29400  # below torchrun's 29400/29500 and Linux's 32768-60999
    assert slurm_master_port("1234_7") == slurm_master_port("1234")


@pytest.mark.parametrize("option, value", [
    ("--job-name", "run\n#SBATCH --uid=0"), ("--partition", "gpu\n"), ("--account", "acct; rm -rf ~"),
    ("--qos", "high$(id)"), ("--constraint", "a100\nsrun evil"), ("--mem", "64G\n"), ("--run-dir", "/tmp/a b"),
])
def test_unsafe_values_never_reach_the_sbatch_script(tmp_path, capsys, option, value):
    """Issue 11: a newline in --job-name & co. became a shell line of the sbatch script.
    Every value is checked before anything is built or submitted: exit 2 naming the option."""
    run_dir = value if option == "--run-dir" else str(tmp_path / "run")
    args = ["--run-dir", run_dir, "--dry-run", *([option, value] if option != "--run-dir" else [])]
    code = launcher.main(args)
    captured = capsys.readouterr()
    assert code == 2 and f"{option}: {value!r} cannot go into the sbatch script" in captured.err
    assert "#SBATCH" not in captured.out


def test_run_name_is_a_plain_name():
    from ssgan_dist.config import ConfigError, load_config

    for name in ("../../etc/x", "a/b", "a\nb", ".hidden", ""):
        with pytest.raises(ConfigError, match="run.name"):
            load_config("demo", [f"run.name={name!r}" if "\n" not in name else 'run.name="a\\nb"'])
    from ssgan_dist.config import MetricsConfig
    from ssgan_dist.errors import SetupError
    from ssgan_dist.telemetry import targets_path

    with pytest.raises(SetupError, match="outside metrics.file_sd"):  # the targets file's own check
        targets_path(MetricsConfig(file_sd="/tmp/targets/"), "../x")


@pytest.mark.skipif(not shutil.which("srun"), reason="submitit's dry run needs srun on PATH")
def test_slurm_constraint_syntax_passes(tmp_path, capsys):
    code = launcher.main(["--run-dir", str(tmp_path / "run"), "--dry-run", "--time", "60", "--partition", "gpu,cpu",
                          "--constraint", "(a100|h100)&[rack1|rack2]*2", "--mem", "64G", "--job-name", "exp-1.2_b"])
    script = capsys.readouterr().out
    assert code == 0 and "#SBATCH --constraint='(a100|h100)&[rack1|rack2]*2'" in script
    assert "#SBATCH --job-name=exp-1.2_b" in script and "#SBATCH --partition=gpu,cpu" in script


def test_the_time_limit_defaults_to_the_partitions():
    """submitit asks for 5 minutes when no --time is given; sinfo's limit is used instead."""
    from ssgan_dist.cluster.submit import _minutes

    assert [_minutes(v) for v in ("2-00:00:00", "12:00:00", "30:00", "UNLIMITED", "infinite")] == \
        [2880, 720, 30, None, None]


@pytest.mark.slow
def test_no_time_on_a_partition_without_limit_is_refused(slurm, tmp_path, capsys):
    """The local partitions have no time limit: nothing is guessed, nothing submitted."""
    code = launcher.main(["--config", "demo", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--time: not given" in err and "give --time MINUTES" in err
    assert _squeue() == []


def test_stop_request_checkpoints_its_step_and_the_resumed_run_is_exact(tmp_path, shards32):
    """The hook the SLURM job uses, in one process: stop after step 3 of 6, start again, compare."""
    asked = []

    def stop_after_third_step() -> bool:
        asked.append(True)
        return len(asked) == 3

    stopped = Trainer(tiny_config(tmp_path / "stopped", shards32, "train.max_steps=6"), setup())
    stopped.fit(stop_after_third_step)
    assert stopped.step == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "stopped")] == ["ckpt-000000003.pt"]
    Trainer(tiny_config(tmp_path / "stopped", shards32, "train.max_steps=6"), setup()).fit()
    Trainer(tiny_config(tmp_path / "straight", shards32, "train.max_steps=6"), setup()).fit(lambda: False)
    _assert_same_training_state(_final_state(tmp_path / "stopped"), _final_state(tmp_path / "straight"))
