"""Train on SLURM through submitit: python cluster/submit.py --config NAME|PATH [key=value ...].

Also ``python -m ssgan_dist.cluster.submit`` or the console script ``ssgan-submit``.

The config is resolved and validated here, before anything is queued: a bad key fails in
the first second with the same message as ``python -m ssgan_dist.train``, not after hours
in a queue. The resolved config travels inside the job, so editing a preset later changes
neither a queued job nor its requeues. One SLURM task per rank (one per GPU); the job
checkpoints and requeues itself on time limit and preemption (see ``job.py``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssgan_dist.config import SAFE_NAME, Config, load_config, require_training_data
from ssgan_dist.errors import SetupError
from ssgan_dist.shell import command_parser, print_config, run_cli

# SIGTERM this many seconds before the time limit: enough to finish the current step and
# write G, D and both Adam states of the 256 px model before SLURM's SIGKILL.
SIGNAL_LEAD_S = 120
# SLURM job states from which the job still goes on (PREEMPTED: requeued next, under
# PreemptMode=REQUEUE), plus ours for a controller that does not answer for a moment.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "UNREACHABLE"}
MONITORING_TARGETS = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus" / "targets"


class SubmitError(SetupError):
    """Something about the submission (not the config) that stops it; exit code 2."""


# What may reach the sbatch script (#SBATCH lines, and the srun line for paths): nothing that
# ends a line, starts a comment, quotes, expands or separates shell words. SLURM's own syntax
# passes: partition lists (a,b), constraint expressions (a&b, [r1|r2], gpu*2, (a|b)&c).
_PLAIN = r"A-Za-z0-9._\-"
SAFE_VALUES = {
    "--job-name": (SAFE_NAME, "1-128 letters, digits, '.', '_', '-', starting with a letter or digit (as run.name)"),
    "--partition": (re.compile(rf"^[{_PLAIN}]+(,[{_PLAIN}]+)*$"), "names of letters, digits, '.', '_', '-', "
                    "comma-separated"),
    "--account": (re.compile(rf"^[{_PLAIN}]+$"), "letters, digits, '.', '_', '-'"),
    "--qos": (re.compile(rf"^[{_PLAIN}]+(,[{_PLAIN}]+)*$"), "letters, digits, '.', '_', '-', comma-separated"),
    "--constraint": (re.compile(rf"^[{_PLAIN},&|\[\]*()]+$"), "feature names and SLURM's & | [ ] * ( ) ,"),
    "--mem": (re.compile(r"^[0-9]+[KMGTkmgt]?$"), "a number with an optional K, M, G or T suffix, e.g. 64G"),
    "--run-dir": (re.compile(r"^[A-Za-z0-9._/+@=,:-]+$"), "a path of letters, digits and . _ / + @ = , : -"),
}


def check_safe(option: str, value: str) -> None:
    """Refuse a value that could change the sbatch script's meaning, naming the option."""
    pattern, allowed = SAFE_VALUES[option]
    if not pattern.fullmatch(value):  # fullmatch: "$" would let a trailing newline through
        raise SubmitError(f"{option}: {value!r} cannot go into the sbatch script; allowed: {allowed}")


def check_submission(args: argparse.Namespace, cfg: Config) -> None:
    """Every value the sbatch script will hold, before anything is submitted. run.dir (from
    --run-dir or the config) names the log files and submitit's folder; the job name is
    --job-name or run.name (config.validate already keeps run.name plain)."""
    for option in ("--job-name", "--partition", "--account", "--qos", "--constraint", "--mem"):
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            check_safe(option, value)
    try:
        check_safe("--run-dir", cfg.run.dir)
    except SubmitError as exc:
        raise SubmitError(f"{exc} (run.dir, resolved)") from None


def parser() -> argparse.ArgumentParser:
    p = command_parser("ssgan_dist.cluster.submit", __doc__, config=True)
    p.add_argument("--nodes", type=_positive, default=1, help="nodes of the job (sbatch --nodes)")
    p.add_argument("--gpus-per-node", type=_non_negative, default=0, help="0: a CPU job (gloo)")
    p.add_argument("--tasks-per-node", type=_positive, default=None,
                   help="ranks per node; default: one per GPU, 1 for a CPU job")
    p.add_argument("--cpus-per-task", type=_positive, default=None,
                   help="default: data.num_workers + 1 (the loader workers plus the rank itself)")
    p.add_argument("--mem", default=None, help="memory per node as sbatch takes it, e.g. 64G; default: the partition's")
    p.add_argument("--partition", default=None, help="SLURM partition; default: the cluster's default partition")
    p.add_argument("--account", default=None, help="account to charge; default: your default account")
    p.add_argument("--qos", default=None, help="quality of service; default: the partition's")
    p.add_argument("--constraint", default=None, help="node features, as sbatch --constraint takes them (e.g. h100)")
    p.add_argument("--time", type=_positive, default=None, metavar="MINUTES",
                   help="time limit of one run (a requeue starts a new one); default: the partition's (sinfo)")
    p.add_argument("--job-name", default=None, help="default: run.name")
    p.add_argument("--run-dir", default=None, help="sets run.dir (made absolute); job logs go to RUN_DIR/slurm/")
    p.add_argument("--max-requeues", type=_non_negative, default=10,
                   help="the job requeues itself after a time limit or preemption at most this many times")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 0 if training finished")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_intermixed_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config as the job will see it: run.dir absolute (the job's working directory
    is not ours to rely on), and with metrics on, file_sd defaulting to monitoring's targets dir."""
    overrides = list(args.overrides)
    if args.run_dir is not None:
        overrides.append(f"run.dir={args.run_dir}")
    cfg = load_config(args.config, overrides)
    if not args.print_config:
        require_training_data(cfg)  # a paper preset without shards: refused before anything is queued
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    if cfg.metrics.enabled and not cfg.metrics.file_sd and MONITORING_TARGETS.is_dir():
        cfg.metrics.file_sd = f"{MONITORING_TARGETS}/"
    return cfg


@dataclass(frozen=True)
class Submission:
    folder: Path  # submitit's pickles and the per-task logs
    parameters: dict[str, Any]  # submitit SlurmExecutor parameters
    max_requeues: int

    @property
    def tasks(self) -> int:
        return self.parameters["nodes"] * self.parameters["ntasks_per_node"]


def plan(args: argparse.Namespace, cfg: Config) -> Submission:
    tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    params: dict[str, Any] = {
        "job_name": args.job_name or cfg.run.name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": args.cpus_per_task or cfg.data.num_workers + 1,
        # submitit's handler must own SIGTERM: preemption and scontrol requeue send it, and
        # the time-limit warning (submitit's USR2 by default) is made SIGTERM too, so one
        # handler serves all three.
        "setup": ["export SUBMITIT_PREEMPT_SIGNAL=TERM"],
        "additional_parameters": {"signal": f"TERM@{SIGNAL_LEAD_S}", "requeue": True},
    }
    optional = {"gpus_per_node": args.gpus_per_node or None, "mem": args.mem, "partition": args.partition,
                "account": args.account, "qos": args.qos, "constraint": args.constraint, "time": args.time}
    params.update({k: v for k, v in optional.items() if v is not None})
    return Submission(Path(cfg.run.dir) / "slurm", params, args.max_requeues)


def executor(sub: Submission) -> Any:
    try:
        import submitit
    except ImportError:
        raise SubmitError("submitit is not installed: pip install -e '.[cluster]' (or pip install 'submitit>=1.5,<1.6')") from None
    try:
        ex = submitit.SlurmExecutor(folder=sub.folder, max_num_timeout=sub.max_requeues)
    except RuntimeError as exc:  # no srun on PATH
        raise SubmitError(f"no SLURM here: {exc}") from None
    ex.update_parameters(**sub.parameters)
    return ex


def sbatch_script(sub: Submission) -> str:
    """Exactly the script submitit would hand to sbatch (its private helpers, pinned in pyproject)."""
    ex = executor(sub)
    return ex._make_submission_file_text(ex._submitit_command_str, uid="dry-run")


def submit(sub: Submission, cfg: Config) -> Any:
    from ssgan_dist.cluster.job import TrainingJob

    sub.folder.mkdir(parents=True, exist_ok=True)
    try:
        return executor(sub).submit(TrainingJob(cfg.to_dict(), sub.max_requeues))
    except subprocess.CalledProcessError as exc:  # sbatch refused (unknown partition, account, ...)
        detail = (exc.stderr or exc.output or b"").decode(errors="replace").strip()
        raise SubmitError(f"sbatch refused the job: {detail or exc}") from None


def job_state(job_id: str) -> str:
    """The job's SLURM state; "" once the controller has forgotten it, UNREACHABLE when squeue fails."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if r.returncode != 0:
        return "" if "Invalid job id" in r.stderr else "UNREACHABLE"
    states = r.stdout.split()
    return states[0] if states else ""


def wait(job: Any, sub: Submission, poll_s: float = 2.0) -> int:
    """Follow the job through requeues until SLURM is done with it; 0 if every task succeeded.

    squeue, not submitit's watcher: that one needs sacct (slurmdbd), and without it never
    sees a job that died before writing its result.
    """
    last = None
    while True:
        state = job_state(job.job_id)
        if state != last:
            print(f"{time.strftime('%H:%M:%S')} job {job.job_id}: {state or 'left the queue'}", flush=True)
            last = state
        if state not in ACTIVE_STATES:
            break
        time.sleep(poll_s)
    from submitit.core.utils import pickle_load

    failures = []
    for task in range(sub.tasks):
        paths = job.task(task).paths
        if not paths.result_pickle.exists():
            failures.append(f"task {task}: no result (it left for a requeue or was killed); see {paths.stderr}")
            continue
        outcome, value = pickle_load(paths.result_pickle)  # ("success", result) or ("error", traceback text)
        if outcome != "success":
            failures.append(f"task {task}: {value.strip().splitlines()[-1]}; see {paths.stderr}")
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0


def describe(job: Any, sub: Submission, cfg: Config) -> str:
    logs = sub.folder / f"{job.job_id}_<task>_log.{{out,err}}"
    return "\n".join([
        f"submitted job {job.job_id}: {sub.tasks} task(s) on {sub.parameters['nodes']} node(s)",
        f"run dir:   {cfg.run.dir}",
        f"train log: {Path(cfg.run.dir) / 'train.log'}",
        f"task logs: {logs}",
        f"follow:    tail -F {job.paths.stderr}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _submit(args, argv))


def partition_time_limit(partition: str | None) -> int:
    """The time limit of ``partition`` (SLURM's default partition when None) in minutes, from
    sinfo: the job's --time when none is given (submitit would otherwise ask for 5 minutes)."""
    cmd = ["sinfo", "-h", "-o", "%l", *(["-p", partition] if partition else [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SubmitError(f"--time: not given, and the partition's time limit cannot be read ({exc}); "
                          "give --time MINUTES") from None
    limits = [_minutes(v) for v in out.stdout.split()] if out.returncode == 0 else []
    known = [m for m in limits if m is not None]
    if not known:
        raise SubmitError(f"--time: not given, and {' '.join(cmd)} gives no finite limit "
                          f"({(out.stdout or out.stderr).strip() or 'no output'}); give --time MINUTES")
    return min(known)


def _minutes(limit: str) -> int | None:
    """sinfo's %l ("[D-]HH:MM:SS", "MM:SS", "UNLIMITED", "infinite") in whole minutes, None if unbounded."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", limit)
    if match is None:
        return None
    days, hours, minutes, _ = (int(g or 0) for g in match.groups())
    return days * 1440 + hours * 60 + minutes


def _submit(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        return print_config(cfg, [parser().prog, *(sys.argv[1:] if argv is None else argv)])
    check_submission(args, cfg)
    if args.time is None and not args.dry_run:
        args.time = partition_time_limit(args.partition)
    sub = plan(args, cfg)
    if args.dry_run:
        print(sbatch_script(sub), end="")
        return 0
    job = submit(sub, cfg)
    print(describe(job, sub, cfg), flush=True)
    if not args.wait:
        return 0
    code = wait(job, sub)
    from ssgan_dist.cluster.job import newest_checkpoint  # submitit is there by now

    print(f"newest checkpoint: {newest_checkpoint(Path(cfg.run.dir)) or 'none'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
