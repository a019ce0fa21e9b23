"""Where a run executes: the accelerator and its precision, CPU threads, memory, and the life of the
process group (set-up before any collective, teardown on every exit path).

Why teardown is its own concern: a process group that is still alive when the interpreter finalises
is destroyed during finalisation, while gloo's worker threads may still hold work whose tensors need
the GIL to be released. The process then aborts after finishing ("terminate called without an active
exception", exit -6; measured on 2 cores: 1 launch in 60 of a 2-process eval). ``destroy_process_group``
alone does not prevent it when something else still holds the group object: torch's
``torch.distributed.nn.functional`` (and two other modules) take ``group.WORLD`` as a default argument
value, evaluated when the module is imported. Imported after the group exists (transformers imports
them with CLIP), ten function defaults keep the destroyed group, and its threads, alive until the
interpreter ends. ``prepare_process_group`` imports them while no group exists, so their defaults
hold None, and ``release_process_group`` then really ends the threads, in order, before exit.
The destruction itself must wait for gloo's workers to let go of their last work
(``settle_process_group``), or the destructor and a worker wait for each other.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path

# Modules whose function defaults capture ``group.WORLD`` at import time (torch 2.11-2.13, DeepSpeed
# 0.19: imported by accelerate during training, even without DeepSpeed in use).
_CAPTURE_WORLD_AT_IMPORT = ("torch.distributed.nn.functional", "torch.distributed.optim.zero_redundancy_optimizer",
                            "torch.distributed.fsdp.sharded_grad_scaler")
_CAPTURE_WORLD_IN_TRAINING = ("deepspeed.comm.torch",)
TEARDOWN_TIMEOUT_S = 300  # how long a finished rank waits for the others at the final barrier


def prepare_process_group(training: bool = False) -> None:
    """Call before a process group is created (an Accelerator, a PartialState): see the module
    docstring. Importing after the group exists is harmless for everything but its teardown."""
    import importlib
    import importlib.util

    import torch

    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return  # too late to help: release_process_group clears what was captured
    check_launch_environment()
    names = [*_CAPTURE_WORLD_AT_IMPORT, *(_CAPTURE_WORLD_IN_TRAINING if training else ())]
    for name in names:
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)


LAUNCH_NEEDS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_launch_environment(environ=None) -> None:
    """Several processes are only joined when a launcher set all it sets (torchrun, accelerate
    launch): a stray RANK or WORLD_SIZE without the rest would wait for peers that never come, or
    fail deep in torch.distributed. Stops at once, in one line, naming what is missing."""
    from vmr.errors import UserError

    environ = os.environ if environ is None else environ
    given = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    if not given:
        return
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
    except ValueError:
        raise UserError(f"RANK/WORLD_SIZE: {environ.get('RANK')!r}/{environ.get('WORLD_SIZE')!r} are not numbers") from None
    if world <= 1 and rank == 0:
        return  # one process: nothing to join
    missing = [name for name in LAUNCH_NEEDS if name not in environ]
    if missing or not 0 <= rank < world:
        raise UserError(f"{'/'.join(given)} set (rank {rank} of {world}) without {', '.join(missing) or 'a valid rank'}: "
                        "start several processes with 'accelerate launch' or torchrun, or unset them to run one")


def process_state():
    """accelerate's PartialState for commands that only need ranks (evaluation, feature extraction),
    with the group prepared first. On CPU-only hosts the ranks must be told (``cpu=True``), or each
    believes it is alone and does all the work."""
    import torch
    from accelerate import PartialState

    prepare_process_group()
    return PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))


def gloo_threads() -> list[str]:
    """Names of this process's native gloo threads (Linux; elsewhere an empty list)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
            if "gloo" in name:
                names.append(name)
    return sorted(names)


SETTLE_S = 0.2  # seconds, GIL released, for gloo's workers to let go of their finished work


def settle_process_group(barrier: bool = True) -> None:
    """Let gloo's worker threads finish with the last collectives before the group can be destroyed.
    A worker drops a finished work (and the Python tensors it holds, which needs the GIL) only after
    the caller's wait returned; if the group's destructor runs first, it holds the GIL while it joins
    that worker, which waits for the GIL: a deadlock (seen once in 70 launches: a DDP rank stuck in
    ``~ProcessGroupGloo`` joining a worker in ``~AsyncAllgatherWork``), or at interpreter exit an
    abort. So: a barrier (every rank done, ``barrier`` False on error paths), then a short sleep that
    releases the GIL to the workers."""
    import time

    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier and dist.get_world_size() > 1:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=TEARDOWN_TIMEOUT_S))
        else:
            dist.barrier()
    time.sleep(SETTLE_S)


def release_process_group(barrier: bool = True) -> None:
    """Tear every process group down while the interpreter is still whole (see the module docstring).
    ``barrier``: wait, at most TEARDOWN_TIMEOUT_S, for the other ranks to finish first (on gloo a
    monitored barrier, which names the ranks that never came); False on an error path, where the
    other ranks may never arrive. Whatever still holds the group afterwards is left to
    ``exit_process``."""
    import gc

    import torch

    dist = torch.distributed
    if not dist.is_available() or not (dist.is_initialized() or gloo_threads()):
        return  # no group was made here (a single process): nothing to release
    try:
        settle_process_group(barrier)
    finally:
        if dist.is_initialized():  # accelerate's end_training may have destroyed it already
            dist.destroy_process_group()
        _forget_deepspeed_groups()
        _drop_captured_groups()
        gc.collect()  # a cycle may still hold the group object


def exit_process(code: int):
    """End the process with ``code`` (the command-line entry points call this, never library code).
    When gloo threads still outlive the process group (something vmr does not own holds it: DeepSpeed
    ZeRO-3 keeps its engine alive through autograd hooks), the interpreter's finalisation would
    destroy the group under those threads and may abort (-6) after the work is done. Then every
    output is flushed and the process ends without finalisation: all of vmr's files are already
    complete (atomic writes, trackers closed by end_training)."""
    if gloo_threads():
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def run_entry(main) -> None:
    """A command-line entry point: ``main()``, then ``exit_process`` with its code, also when it
    raised (a bug: its traceback is printed first) or asked to exit (argparse's --help, usage)."""
    import traceback

    try:
        code = main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    except Exception:
        traceback.print_exc()
        code = 1
    exit_process(code)


def _drop_captured_groups() -> None:
    """The second line of defence: function defaults that still hold a (destroyed) process group,
    from a module imported after the group was made that ``prepare_process_group`` does not know,
    are set to None, which every such function reads as "the default group". One walk over the
    collector's objects, at teardown only (about 0.1 s)."""
    import gc
    import types

    for obj in gc.get_objects():
        if type(obj) is not types.FunctionType:  # type(), not isinstance: no attribute lookups
            continue
        if obj.__defaults__ and any(type(d).__name__ == "ProcessGroup" for d in obj.__defaults__):
            obj.__defaults__ = tuple(None if type(d).__name__ == "ProcessGroup" else d for d in obj.__defaults__)
        if obj.__kwdefaults__ and any(type(d).__name__ == "ProcessGroup" for d in obj.__kwdefaults__.values()):
            obj.__kwdefaults__ = {k: None if type(d).__name__ == "ProcessGroup" else d
                                  for k, d in obj.__kwdefaults__.items()}


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the groups it made in module globals: drop them with the groups."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and type(value).__name__ == "ProcessGroup":
            setattr(groups, name, None)
        elif name.startswith("_") and isinstance(value, dict) and any(
                type(v).__name__ == "ProcessGroup" for v in value.values()):
            value.clear()


@contextlib.contextmanager
def process_group_scope():
    """Run a distributed command and release its process group on every exit path: after a barrier
    when it finished, at once on an error or an interrupt (the other ranks may never arrive)."""
    try:
        yield
    except BaseException:
        release_process_group(barrier=False)
        raise
    release_process_group(barrier=True)


def precision_for(asked: str, cuda: bool, mps: bool, bf16_ok: bool) -> str:
    """``auto``: bf16 on CUDA where supported, else fp16 (with loss scaling); fp16 on MPS; fp32 on CPU."""
    from vmr.errors import UserError

    if asked == "auto":
        return ("bf16" if bf16_ok else "fp16") if cuda else "fp16" if mps else "no"
    if asked == "fp16" and not (cuda or mps):
        raise UserError("train.mixed_precision: fp16 needs a CUDA or MPS device; on a CPU use bf16 or no")
    return asked


def make_accelerator(cfg):
    """The training Accelerator for ``cfg`` (a vmr Config): device, precision, DeepSpeed's batch
    values, TensorBoard under ``train.output_dir``."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    prepare_process_group(training=True)
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not cuda:
        # Without a GPU, DeepSpeed's ranks only find each other over gloo (else each believes it is alone).
        PartialState(backend="gloo")
    precision = precision_for(cfg.train.mixed_precision, cuda, mps, cuda and torch.cuda.is_bf16_supported())
    out = Path(cfg.train.output_dir)
    compile_options = {}
    if cfg.train.compile:  # fixed batch shapes (BatchShape): one compilation serves every step
        from accelerate.utils import TorchDynamoPlugin

        compile_options["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", dynamic=False)
    accelerator = Accelerator(
        cpu=not (cuda or mps or deepspeed),  # CPU ranks must be told, or each trains alone
        mixed_precision=precision,
        **compile_options,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # The loader is not prepared, so DeepSpeed's "auto" batch and clipping values come from here.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        plugin.deepspeed_config["train_batch_size"] = (cfg.train.batch_size * cfg.train.grad_accum
                                                       * accelerator.num_processes)
        if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = cfg.train.max_grad_norm
    return accelerator


def cpu_threads(workers: int, local_processes: int, cores: int | None = None) -> int:
    """Compute threads for each training process on a CPU: the cores left after every process's
    loader workers, shared by this machine's processes. More compete with the workers' decoding for
    the same cores: on 2 cores with 1 worker, a tiny-config step took 1.35 s with torch's default
    2 threads and 0.95 s with 1 (vmr bench train)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, local_processes) - workers)


@contextlib.contextmanager
def compute_threads(device, workers: int, local_processes: int = 1):
    """On a CPU, torch's threads set to ``cpu_threads`` for the duration (unless OMP_NUM_THREADS is
    set: an explicit setting wins), then restored: training may run inside a notebook."""
    import torch

    threads = torch.get_num_threads()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(workers, local_processes))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def memory_mb(device) -> float:
    """Peak allocated memory on CUDA, else this process's resident memory, in MB."""
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20
