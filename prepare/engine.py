"""Running prepare's units on many cores and machines through datatrove's executors.

    run_local(work, tasks=8, workers=2)                 # all cores of this machine
    run_local(work, tasks=64, workers=16, local_tasks=16, rank_offset=16)   # this machine's share
    submit_slurm(work, logs, tasks=512, partition="cpu", time="24:00:00")  # a job array + a merge job

Why datatrove: it is what Hugging Face runs FineWeb's and SmolLM's data processing on, the
same task model on a laptop (LocalPipelineExecutor), a SLURM cluster (SlurmPipelineExecutor:
job arrays, requeue, a dependent job) and Ray (RayPipelineExecutor), with per-task logs and
stats. Task `rank` of `tasks` tokenizes units rank, rank + tasks, ...; each unit's result is
its own set of part files (prepare.parts), so what a task leaves behind when it is killed is
exactly the units it finished, and the merged output is the same for any number of tasks.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from tinyllama.formats.tokenizer import Tokenizer

from .encoding import piece_encoder
from .merge import finish
from .parts import Plan, run_units

_tokenizers: dict[str, Tokenizer] = {}     # per worker process: loaded once, its piece cache kept warm


def seed_tokenizer(plan: Plan, tok: Tokenizer) -> None:
    """Hands the tokenizer prepare already loaded to this process's tasks (and, through fork,
    to the worker processes): no second load, and one piece cache."""
    piece_encoder(tok, native_of(plan))     # built here, before the workers fork
    _tokenizers[plan.settings["tokenizer_dir"] or ""] = tok


def plan_tokenizer(plan: Plan) -> Tokenizer:
    key = plan.settings["tokenizer_dir"] or ""
    if key not in _tokenizers:
        tok = Tokenizer.from_dir(key) if key else Tokenizer.llama2()
        if tok.fingerprint != plan.tokenizer_fingerprint:
            raise RuntimeError(f"{key or 'the Llama-2 tokenizer'} differs from the one this run was planned with")
        piece_encoder(tok, native_of(plan))
        _tokenizers[key] = tok
    return _tokenizers[key]


def native_of(plan: Plan) -> str:
    """The piece cache's native mode the run was started with (tinyllama.runtime; plans from
    before it: auto)."""
    return plan.settings.get("native", "auto")


class TokenizeUnits(PipelineStep):
    """Task `rank` of `world_size`: tokenizes units rank, rank + world_size, ... not done yet."""
    name = "tokenize units"
    type = "🔢 - TOKENIZER"

    def __init__(self, work: str) -> None:
        super().__init__()
        self.work = work

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"      # one task per core
        work = Path(self.work)
        plan = Plan.load(work)
        s = plan.settings
        done = run_units(work, plan, range(rank, len(plan.units), world_size), plan_tokenizer(plan),
                         remote_retries=s["retries"], chunk_docs=s["chunk_docs"], chunk_chars=s["chunk_chars"])
        self.stat_update("units", value=done)


class MergeParts(PipelineStep):
    """The merge, as a one-task job that runs after the tokenizing ones (SLURM)."""
    name = "merge parts into shards"
    type = "💽 - WRITER"

    def __init__(self, work: str) -> None:
        super().__init__()
        self.work = work

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finish(Path(self.work))


@contextmanager
def _quiet_loguru():
    """datatrove logs through loguru, task by task, to the terminal; prepare shows its own
    progress instead, and errors reach the user as exceptions."""
    from loguru import logger

    logger.disable("datatrove")          # inherited by forked workers
    try:
        yield
    finally:
        logger.enable("datatrove")


def run_local(work: Path, *, tasks: int, workers: int, local_tasks: int = -1, rank_offset: int = 0) -> None:
    executor = LocalPipelineExecutor(
        pipeline=[TokenizeUnits(str(work))], tasks=tasks, workers=min(workers, tasks),
        logging_dir=str(work / "logs"), local_tasks=local_tasks, local_rank_offset=rank_offset,
        # fork: workers start with the tokenizer already loaded (forkserver would re-import and
        # reload it in each, ~1 s); they never touch the progress bar the parent's thread owns
        start_method="fork" if sys.platform == "linux" else "spawn",
        # our part files say which units are done; datatrove's per-task marks would be wrong
        # for a resumed run with another task count
        skip_completed=False)
    with _quiet_loguru():
        executor.run()


def submit_slurm(work: Path, logs: Path, *, tasks: int, partition: str | None, time: str, cpus_per_task: int = 1,
                 mem_per_cpu_gb: float = 2, sbatch_args: dict | None = None, env_command: str | None = None,
                 job_name: str = "tinyllama-prepare") -> tuple[str, str]:
    """Submits the tokenizing job array and the merge job (afterok); returns their job ids.
    Their logs go to `logs` (kept: the work folder goes away when the merge has run)."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    venv = Path(sys.prefix) / "bin" / "activate"
    common = dict(time=time, partition=partition, cpus_per_task=cpus_per_task, mem_per_cpu_gb=mem_per_cpu_gb,
                  sbatch_args=sbatch_args or {}, env_command=env_command, skip_completed=False,
                  venv_path=str(venv) if env_command is None and venv.exists() else None)
    tokenize = SlurmPipelineExecutor(pipeline=[TokenizeUnits(str(work))], tasks=tasks, job_name=job_name,
                                     logging_dir=str(logs / "tokenize"), **common)
    merge = SlurmPipelineExecutor(pipeline=[MergeParts(str(work))], tasks=1, job_name=f"{job_name}-merge",
                                  logging_dir=str(logs / "merge"), depends=tokenize, **common)
    with _quiet_loguru():
        merge.run()
    return str(tokenize.job_id), str(merge.job_id)
