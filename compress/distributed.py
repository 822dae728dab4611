"""Data-parallel calibration over several GPUs (or CPU processes) with torch.distributed.

Every rank holds the current decoder layer and a contiguous share of the calibration samples.
The statistics a pass gathers (Gram sums, |x| and x^2 sums, token counts) are summed over the
ranks and then normalised by the global count, as one process does; each per-module solve
(GPTQ, SparseGPT) runs on one rank and its result is broadcast, so every rank holds the same
changed layer before the next layer's forward. Rank 0 alone holds the output lock and writes
the run state and the artifact; the others only read what it wrote.

`compress apply --gpus N` starts N processes itself (torch.multiprocessing, spawn); under
torchrun (RANK and WORLD_SIZE set) each process joins that group instead. NCCL on CUDA, gloo
on CPU. Without a group every function here is the single-process identity.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from compress.errors import CompressError, UsageError

T = TypeVar("T")

# A collective that waits longer than this fails instead of hanging (a rank stuck or gone).
# It must exceed the longest gap between two collectives: rank 0 hashing a 70B checkpoint's
# files before the others receive the run state takes minutes.
TIMEOUT_S = float(os.environ.get("COMPRESS_DIST_TIMEOUT", "1800"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Rank 0 (or the only process): it holds the lock and writes run state and artifact."""
    return rank() == 0


def env_world_size() -> int | None:
    """The group size torchrun (or our own launcher) put in the environment, if any."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and \
        "WORLD_SIZE" in os.environ else None


# ---------------------------------------------------------------------------------------------
# Starting and joining a group

def check_request(gpus: int | None, device: str, recipe) -> int:
    """The number of ranks to run with, checked before any process starts or model loads."""
    joined = env_world_size()
    if gpus is None:
        gpus = joined or 1
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: give at least 1")
    if joined is not None and joined != gpus:
        raise UsageError(f"--gpus {gpus} but this process belongs to a group of {joined} "
                         "(WORLD_SIZE): leave --gpus out under torchrun or make them agree")
    if gpus == 1:
        return 1
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {device} with --gpus {gpus}: ranks use cuda:0..{gpus - 1} "
                         "(CUDA_VISIBLE_DEVICES chooses which); use --device cuda, or cpu")
    if device != "cpu" and joined is None and torch.cuda.device_count() < gpus:
        raise UsageError(f"--gpus {gpus}: {torch.cuda.device_count()} CUDA device(s) here; "
                         f"use fewer, or --device cpu to run {gpus} CPU processes")
    for cfg in recipe.passes:
        if not cfg.data_parallel:
            raise UsageError(f"pass {cfg.kind!r} does not run on several GPUs yet: use --gpus 1")
    if recipe.calibration.samples < gpus:
        raise UsageError(f"calibration.samples {recipe.calibration.samples} is fewer than "
                         f"--gpus {gpus}: every rank needs at least one sample")
    return gpus


def should_launch(gpus: int) -> bool:
    """True when this process must start the ranks itself (not already one of them)."""
    return gpus > 1 and env_world_size() is None


@contextmanager
def joined(device: str) -> Iterator[str]:
    """Join the group the environment describes (torchrun's, or our launcher's) for the block;
    yields this rank's device. Outside a group: yields `device` unchanged."""
    size = env_world_size()
    if size is None or size == 1 or active():
        yield device
        return
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device == "cpu":
        backend, mine = "gloo", "cpu"
        # the ranks share the host's cores
        per_rank = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_rank))
    else:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise UsageError(f"rank {os.environ['RANK']} needs cuda:{local}, and "
                             f"{torch.cuda.device_count()} CUDA device(s) are here; add "
                             "--device cpu for CPU processes")
        backend, mine = "nccl", f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    if rank() != 0:  # one progress display: rank 0's
        from transformers.utils import logging

        from compress.progress import console

        console.quiet = True
        logging.disable_progress_bar()
    yield mine
    # Only after success: after a failure a peer may be gone, and NCCL's teardown could wait.
    dist.destroy_process_group()


def launch(gpus: int, fn: Callable[..., T], args: tuple, kwargs: dict, partial: Path) -> T:
    """Run fn(*args, **kwargs) in `gpus` new processes forming one group; return rank 0's
    result. A rank that fails stops them all: its one-line error is raised here, with the
    exit code it had (a killed rank: 1, and how to resume the run it left in `partial`)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="compress-ranks-") as outcomes:
        context = mp.start_processes(_rank_main, (gpus, _free_port(), outcomes, fn, args, kwargs),
                                     nprocs=gpus, join=False, start_method="spawn")
        try:
            while not context.join(grace_period=5):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
            raise _failure(context.processes, exc.error_index, Path(outcomes), partial) \
                from None
        except KeyboardInterrupt:
            _interrupt(context.processes)
            raise
        return _outcome(Path(outcomes), 0)["result"]


def _rank_main(index: int, size: int, port: int, outcomes: str, fn, args, kwargs) -> None:
    """One spawned rank: the environment torchrun would give it, then fn; its outcome (result
    or one-line error) goes to a file for the launcher (a pipe could fill up and block)."""
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(size),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code, outcome = 0, {}
    try:
        outcome["result"] = fn(*args, **kwargs)
    except CompressError as exc:
        code, outcome["error"] = exc.exit_code, str(exc)
    except KeyboardInterrupt:
        code, outcome["error"] = 130, "interrupted"
    except Exception as exc:  # noqa: BLE001  (a bug: one line; COMPRESS_DEBUG=1: traceback)
        if os.environ.get("COMPRESS_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        code, outcome["error"] = 1, (f"unexpected {type(exc).__name__}: {first} (a bug in "
                                     "compress: please report it; COMPRESS_DEBUG=1 shows the "
                                     "traceback)")
    (Path(outcomes) / f"rank-{index}.json").write_text(json.dumps(outcome))
    sys.exit(code)


def _outcome(outcomes: Path, index: int) -> dict:
    path = outcomes / f"rank-{index}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _failure(processes, first: int, outcomes: Path, partial: Path) -> CompressError:
    """The error to show for a failed group: a rank that died by a signal (not the SIGTERM the
    launcher sends the others) is the cause; else the rank seen failing `first` (its peers'
    errors, such as a closed connection, follow from it); else any rank's error."""
    codes = [p.exitcode for p in processes]
    dead = [i for i, c in enumerate(codes) if c is not None and c < 0 and c != -signal.SIGTERM]
    if dead:
        from compress.resume import MANIFEST

        kept = (f"the interrupted run is kept in {partial}: rerun the same command to resume, "
                "or add --restart to discard it" if (partial / MANIFEST).is_file()
                else "nothing was written")
        return CompressError(f"rank {dead[0]} of {len(processes)} died "
                             f"({signal.Signals(-codes[dead[0]]).name}); {kept}")
    for i in [first] + [i for i in range(len(codes)) if i != first]:
        code, error = codes[i], _outcome(outcomes, i).get("error")
        if error:
            return CompressError(f"rank {i}: {error}" if i else error, exit_code=code or 1)
    return CompressError(f"a rank stopped with exit codes {codes} and no message")


def _interrupt(processes) -> None:
    """Ctrl-C reached the launcher (from a terminal, the ranks got it too): let the ranks stop
    (rank 0 keeps its run state for resume), pass SIGINT to any still running, then kill."""
    for process in processes:
        process.join(timeout=5)
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# What the calibrator and the passes call

def share_of(samples: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration samples [N, L]."""
    n, size, me = samples.shape[0], world_size(), rank()
    return samples[me * n // size:(me + 1) * n // size]


def sum_stats(stats: dict[str, Any], fields: Sequence[str]) -> None:
    """Sum each entry's `count` and tensor `fields` over the ranks, in place. An entry a rank's
    samples never reached (an MoE expert) has None there: it counts as zeros of the size the
    other ranks saw; an entry no rank reached stays None, as in one process."""
    if not active() or not stats:
        return
    entries = list(stats.values())
    some = next((getattr(e, f) for e in entries for f in fields if getattr(e, f) is not None),
                None)
    device = some.device if some is not None else _device()
    dtype = some.dtype if some is not None else torch.float32
    counts = torch.tensor([e.count for e in entries], dtype=torch.int64, device=device)
    widths = torch.tensor([_width(e, fields) for e in entries], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)
    for entry, count, width in zip(entries, counts.tolist(), widths.tolist()):
        entry.count = count
        if width == 0:  # no rank saw a token (the same answer on every rank)
            continue
        for name in fields:
            value = getattr(entry, name)
            if value is None:
                shape = (width, width) if name == "gram" else (width,)
                value = torch.zeros(shape, dtype=dtype, device=device)
            dist.all_reduce(value)
            setattr(entry, name, value if count else None)


def _width(entry, fields: Sequence[str]) -> int:
    return next((getattr(entry, f).shape[0] for f in fields if getattr(entry, f) is not None), 0)


def owners(costs: Sequence[float], size: int) -> list[int]:
    """Which rank runs each job: the costliest first, each to the least-loaded rank (ties to the
    lowest rank). The same answer on every rank, from the costs alone."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        owner[job] = min(range(size), key=lambda r: load[r])
        load[owner[job]] += costs[job]
    return owner


def spread(jobs: Sequence[Callable[[], T]], costs: Sequence[float]) -> list[T]:
    """Run each job on one rank and give every rank every result (in job order). Every rank
    runs all of its jobs first, then the results are broadcast: no rank waits for another's
    job before starting its own."""
    if not active():
        return [job() for job in jobs]
    owner = owners(costs, world_size())
    mine = {j: job() for j, job in enumerate(jobs) if owner[j] == rank()}
    return [share(mine.get(j), owner[j]) for j in range(len(jobs))]


def share(obj: T, src: int) -> T:
    """`obj` as rank `src` has it, on every rank: its tensors through dist.broadcast (device to
    device under NCCL), everything else pickled; tensors on CPU at src are on CPU everywhere,
    the others on this rank's device."""
    if not active():
        return obj
    tensors: list[torch.Tensor] = []
    header: list[Any] = [None]
    if rank() == src:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer)
        pickler.persistent_id = lambda o: _keep(o, tensors)
        pickler.dump(obj)
        header = [(buffer.getvalue(), [(t.shape, t.dtype, t.device.type) for t in tensors])]
    dist.broadcast_object_list(header, src=src, device=_device())
    payload, specs = header[0]
    if rank() != src:
        tensors = [torch.empty(shape, dtype=dtype, device=_device()) for shape, dtype, _ in specs]
    for tensor in tensors:
        dist.broadcast(tensor, src=src)
    if rank() == src:
        return obj
    unpickler = pickle.Unpickler(io.BytesIO(payload))
    unpickler.persistent_load = lambda i: tensors[i].to("cpu") if specs[i][2] == "cpu" \
        else tensors[i]
    return unpickler.load()


def _keep(obj, tensors: list[torch.Tensor]) -> int | None:
    """Pickle's hook at the source: a tensor is sent separately; its index stands in for it."""
    if not isinstance(obj, torch.Tensor):
        return None
    tensors.append(obj.detach().to(_device()).contiguous())
    return len(tensors) - 1


def from_writer(fn: Callable[[], T]) -> T:
    """fn() run by rank 0 alone (it reads or writes shared files), its result on every rank."""
    return share(fn() if is_writer() else None, 0)


def barrier() -> None:
    if active():  # (NCCL: on this rank's GPU, which it cannot guess before a collective)
        dist.barrier(device_ids=[torch.cuda.current_device()]
                     if dist.get_backend() == "nccl" else None)


def _device() -> torch.device:
    """Where this rank's collectives put tensors: its GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory(device: torch.device) -> list[dict[str, Any]]:
    """Per rank: its device and its peak memory in GB (CUDA: allocated by torch; CPU: the
    process's peak resident set), gathered on every rank."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    mine = {"device": str(device), "peak_memory_gb": round(peak, 3)}
    if not active():
        return [mine]
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
