"""Where tasks run: local worker processes (default) or a Ray cluster.

An executor takes the list of tasks and yields ``(task, result)`` as each one
finishes, in completion order. Results come back to the coordinating process,
which alone writes the results store.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tinyptq.ablate.worker import Task, execute
from tinyptq.errors import ConfigError, first_line

EXECUTORS = ("local", "ray")


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """TensorFlow threads per worker so that the workers together fill the cores."""
    return max(1, cpu_count() // max(1, workers))


class LocalExecutor:
    """``workers`` spawned processes (or this process when workers is 1)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        self.workers = workers

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, dict[str, Any]]]:
        for task in tasks:
            task.threads = task.threads or threads_per_worker(self.workers)
        if self.workers == 1:
            for task in tasks:
                yield task, execute(task)
            return
        context = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        pool = ProcessPoolExecutor(
            max_workers=min(self.workers, max(1, len(tasks))),
            mp_context=context,
        )
        try:
            pending: dict[Future, Task] = {pool.submit(execute, t): t for t in tasks}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        result = {
                            "status": "failed",
                            "error": "worker process died (out of memory?)",
                        }
                    yield task, result
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class RayExecutor:
    """Tasks as Ray remote functions, one CPU each; a local Ray instance unless ``address``."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'tinyptq[ray]'") from None
        self.workers = workers
        self.address = address

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, dict[str, Any]]]:
        import logging

        import ray

        env = {k: v for k, v in os.environ.items() if k.startswith(("TINYPTQ_", "TF_"))}
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
                "runtime_env": {"env_vars": env},
            }
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.workers, **kwargs)
        threads = 1 if self.address else threads_per_worker(self.workers)
        remote = ray.remote(num_cpus=1, max_retries=0)(execute)
        try:
            pending = {}
            for task in tasks:
                task.threads = task.threads or threads
                pending[remote.remote(task)] = task
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                for ref in finished:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # a worker crash or a lost node
                        name, reason = type(exc).__name__, first_line(exc, 200)
                        result = {
                            "status": "failed",
                            "error": f"ray: {name}" if reason == name else f"ray: {name}: {reason}",
                        }
                    yield task, result
        finally:
            if started:
                ray.shutdown()


def make_executor(
    name: str, workers: int, address: str | None = None
) -> LocalExecutor | RayExecutor:
    """The executor called ``name``."""
    if name == "local":
        if address:
            raise ConfigError("--address only applies to --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, address)
    raise ConfigError(f"unknown executor '{name}'; valid: {', '.join(EXECUTORS)}")
