"""Tensor parallelism over processes: rank 0 is a worker in the engine's process (the driver), the other
ranks are processes of their own, on this host (spawned here) or on others (`pagetron worker`).

    engine process (rank 0)                      rank r (spawned, or `pagetron worker` on another host)
    ----------------------------------------     -----------------------------------------------------
    TCPStore (master, at dist_init_addr)    <--  joins the store, sets joined/r
    init_process_group (all ranks)          <->  init_process_group
    Worker: load shard, measure KV          ...  Worker: load shard, measure KV, sets loaded/r = blocks
    kv_blocks = min(loaded/*) -> store      -->  reads kv_blocks, allocates its KV cache
    execute(step):
      build host inputs (the scheduler's)
      broadcast header + 2 buffers (gloo)   -->  receives them
      [+ LoRA: rows' adapter slots, and the
         adapters newly put in slots (JSON)] -->  loads those adapters (same slots), sets the rows' slots
      forward (all-reduces inside)          <->  forward
      logits gathered on rank 0, sampled    <--  sends its logits shard
    shutdown: broadcast STOP                -->  exits

The store's keys replace collectives while ranks start up, so rank 0 notices at once when a local rank
dies or fails to load, instead of waiting in a collective. Step inputs travel on a gloo group (host
buffers); the model's collectives use the default group (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pagetron.backend.core.config import EngineConfig
from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.step import RunnerOutput, SchedulerOutput
from pagetron.backend.executor.executor import Executor
from pagetron.backend.executor.spec import ModelSpec
from pagetron.backend.executor.step_inputs import HostStepInputs, StepShape, aligned_offsets
from pagetron.backend.executor.worker import Worker
from pagetron.backend.model.parallel import TensorParallel

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # for every rank to join and load its shard (other hosts may start later)
RANK_EXIT_GRACE_S = 0.5  # after a failed collective, how long a local rank gets to show it has exited
# NOTE: idle ranks wait in a broadcast for the next step for as long as the engine is idle, so the
# groups' own timeout must not end them; a dead peer is noticed by its closed connection instead.
IDLE_FOREVER = datetime.timedelta(days=365)
HEADER = 16  # int64 slots of a step header
STOP, STEP = 0, 1


class WorkerFailed(RuntimeError):
    pass


# ---- the step protocol ---------------------------------------------------------------------------------
@dataclass
class LoRAStep:
    """A step's LoRA part: each token row's adapter slot (-1: none; empty: no row uses one) and the
    adapters the driver put in slots for it."""

    token_slots: list[int]
    loads: list[tuple[int, LoRARequest]]

    def encoded_loads(self) -> bytes:
        return json.dumps([[s, r.lora_name, r.lora_int_id, r.lora_path] for s, r in self.loads]).encode()

    @staticmethod
    def decode_loads(raw: bytes) -> list[tuple[int, LoRARequest]]:
        return [(s, LoRARequest(name, i, path)) for s, name, i, path in json.loads(raw)]


def send_step(host: HostStepInputs | None, group, lora: LoRAStep | None = None) -> None:
    header = torch.zeros(HEADER, dtype=torch.int64)
    loads = lora.encoded_loads() if lora is not None and lora.loads else b""
    slots = lora.token_slots if lora is not None else []
    if host is not None:
        s = host.shape
        values = [STEP, s.num_tokens, s.num_decodes, s.num_prefills, s.num_sampled, s.decode_width,
                  s.prefill_width, host.longs.size, host.ints.size, len(slots), len(loads)]  # fmt: skip
        header[: len(values)] = torch.tensor(values)
    dist.broadcast(header, src=0, group=group)
    if host is not None:
        dist.broadcast(torch.from_numpy(np.ascontiguousarray(host.longs)), src=0, group=group)
        dist.broadcast(torch.from_numpy(np.ascontiguousarray(host.ints)), src=0, group=group)
    if slots:
        dist.broadcast(torch.tensor(slots, dtype=torch.int32), src=0, group=group)
    if loads:
        dist.broadcast(torch.frombuffer(bytearray(loads), dtype=torch.uint8), src=0, group=group)


def receive_step(group) -> tuple[HostStepInputs, LoRAStep] | None:
    header = torch.zeros(HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    op, tokens, decodes, prefills, sampled, decode_width, prefill_width, n_longs, n_ints, n_slots, n_loads = (
        header[:11].tolist()
    )
    if op == STOP:
        return None
    longs, ints = torch.empty(n_longs, dtype=torch.int64), torch.empty(n_ints, dtype=torch.int32)
    dist.broadcast(longs, src=0, group=group)
    dist.broadcast(ints, src=0, group=group)
    lora = LoRAStep([], [])
    if n_slots:
        token_slots = torch.empty(n_slots, dtype=torch.int32)
        dist.broadcast(token_slots, src=0, group=group)
        lora.token_slots = token_slots.tolist()
    if n_loads:
        raw = torch.empty(n_loads, dtype=torch.uint8)
        dist.broadcast(raw, src=0, group=group)
        lora.loads = LoRAStep.decode_loads(raw.numpy().tobytes())
    ints_np = ints.numpy()
    # the prefill query starts and lengths are parts of the int buffer (see step_inputs.py's layout)
    sizes = StepShape(tokens, decodes, prefills, sampled, decode_width, prefill_width, (), ()).int_sizes()
    offsets = aligned_offsets(sizes, itemsize=4)
    starts = tuple(int(x) for x in ints_np[offsets[2] : offsets[2] + prefills + 1])
    lens = tuple(int(x) for x in ints_np[offsets[3] : offsets[3] + prefills])
    shape = StepShape(tokens, decodes, prefills, sampled, decode_width, prefill_width, starts, lens)
    return HostStepInputs(shape, longs.numpy(), ints_np), lora


# ---- process groups ------------------------------------------------------------------------------------
@dataclass
class Rendezvous:
    """Where the ranks meet: the TCP store of rank 0 and the process groups built on it."""

    store: dist.TCPStore
    world_size: int

    @classmethod
    def connect(cls, addr: str, world_size: int, is_master: bool) -> Rendezvous:
        host, _, port = addr.rpartition(":")
        timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
        store = dist.TCPStore(host, int(port), world_size, is_master, timeout, wait_for_workers=False)
        return cls(store, world_size)

    def init_groups(self, rank: int, device: torch.device) -> tuple[TensorParallel, object]:
        """(the model's tensor-parallel group, the gloo group step inputs travel on)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=self.store, rank=rank, world_size=self.world_size, timeout=IDLE_FOREVER
        )
        steps = dist.group.WORLD
        if backend == "nccl":
            steps = dist.new_group(backend="gloo", timeout=IDLE_FOREVER)
        return TensorParallel(rank, self.world_size, dist.group.WORLD), steps


def local_device(config: EngineConfig) -> torch.device:
    """The kind of device the ranks run on (each takes its own index later)."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ---- the other ranks -----------------------------------------------------------------------------------
def run_rank(config: EngineConfig, addr: str, rank: int, local_rank: int, die_with_parent: bool) -> None:
    """The life of one non-driver rank: join, load its shard, serve steps until told to stop."""
    if die_with_parent:
        _die_with_parent()
    ranks_here = config.tensor_parallel_size // config.nnodes
    if local_device(config).type == "cpu":  # ranks of one host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    rendezvous = Rendezvous.connect(addr, config.tensor_parallel_size, is_master=False)
    store = rendezvous.store
    store.set(f"joined/{rank}", "1")
    try:
        spec = ModelSpec.from_config(config)
        tp, steps = rendezvous.init_groups(rank, local_device(config))
        worker = Worker(spec, tp, local_rank)
    except BaseException as e:
        store.set(f"failed/{rank}", f"{type(e).__name__}: {e}")
        raise
    store.set(f"loaded/{rank}", str(worker.max_kv_blocks))
    worker.initialize_cache(int(store.get("kv_blocks")))
    while (step := receive_step(steps)) is not None:
        host, lora = step
        if worker.lora is not None:
            worker.lora.mirror(lora.loads, lora.token_slots)
        worker.runner.run(host, None)
    dist.destroy_process_group()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a spawned rank goes when the process that spawned it goes (even by SIGKILL)."""
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def python_executable() -> str:
    """The interpreter to start ranks with (in Triton's Python-backend stub, sys.executable is the stub)."""
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    candidate = os.path.join(sys.exec_prefix, "bin", "python3")
    return candidate if os.path.exists(candidate) else shutil.which("python3") or sys.executable


RANK_CONFIG_ENV = "PAGETRON_RANK_CONFIG"  # the engine arguments, as JSON, for a rank process


def spawn_ranks(config: EngineConfig, addr: str, node_rank: int, first_in_process: bool) -> list[Rank]:
    """This host's ranks as processes (all of them, or all but the first when it runs in this process).

    NOTE: fresh interpreters (``python -m ...multiproc``), not multiprocessing's spawn, which re-runs the
    parent's main module: a script without a __main__ guard, or Triton's stub, would start over.
    """
    per_node = config.tensor_parallel_size // config.nnodes
    env = {**os.environ, RANK_CONFIG_ENV: json.dumps(dataclasses.asdict(config))}
    ranks = []
    for local_rank in range(1 if first_in_process else 0, per_node):
        rank = node_rank * per_node + local_rank
        command = [python_executable(), "-m", __name__, addr, str(rank), str(local_rank)]
        ranks.append(Rank(rank, subprocess.Popen(command, env=env)))
    return ranks


@dataclass
class Rank:
    rank: int
    process: subprocess.Popen

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def describe(self) -> str:
        return f"tensor-parallel rank {self.rank} (pid {self.process.pid}) exited with code {self.exitcode}"


def exited_ranks(procs: list[Rank], grace_s: float) -> list[str]:
    """What became of the rank processes that have exited, waiting up to ``grace_s`` for one to show.

    NOTE: a killed process closes its sockets before it becomes a zombie its parent can reap, so a
    collective's "connection reset" can arrive while poll() still says the rank runs.
    """
    deadline = time.monotonic() + grace_s
    while True:
        dead = [proc.describe() for proc in procs if proc.exitcode is not None]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.01)


def main() -> None:
    """A rank process: ``python -m pagetron.backend.executor.multiproc ADDR RANK LOCAL_RANK``."""
    addr, rank, local_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = EngineConfig.from_dict(json.loads(os.environ[RANK_CONFIG_ENV]))
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(message)s")
    run_rank(config, addr, rank, local_rank, die_with_parent=True)


# ---- rank 0 ---------------------------------------------------------------------------------------------
class MultiprocExecutor(Executor):
    def __init__(self, spec: ModelSpec):
        config = spec.config
        self.world_size = config.tensor_parallel_size
        addr = config.rendezvous_address() if config.nnodes > 1 else free_address()
        rendezvous = Rendezvous.connect(addr, self.world_size, is_master=True)
        self.store = rendezvous.store
        self.procs = spawn_ranks(config, addr, node_rank=0, first_in_process=True)
        self._failed: str | None = None
        self._closed = False
        try:
            self._wait_for("joined")
            self.tp, self.steps = rendezvous.init_groups(0, local_device(config))
            self.worker = Worker(spec, self.tp, local_rank=0)
            blocks = [self.worker.max_kv_blocks] + [int(b) for b in self._wait_for("loaded")]
            self.num_kv_blocks = min(blocks)
            self.store.set("kv_blocks", str(self.num_kv_blocks))
            self.worker.initialize_cache(self.num_kv_blocks)
            if self.worker.lora is not None:
                self.worker.lora.record_slot_loads = True
        except BaseException:
            self._kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        self.device_name = f"{self.worker.device} x {self.world_size} ranks"
        logger.info("tensor parallel: %d ranks, %d KV blocks each", self.world_size, self.num_kv_blocks)
        self._monitor = threading.Thread(target=self._watch_ranks, name="pagetron-rank-monitor", daemon=True)
        self._monitor.start()

    def _wait_for(self, stage: str) -> list[str]:
        """The values every other rank set for ``stage``, polling: a rank that dies or fails ends it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        ranks = range(1, self.world_size)
        while True:
            for rank in ranks:
                if self.store.check([f"failed/{rank}"]):
                    raise WorkerFailed(
                        f"tensor-parallel rank {rank} failed: {_text(self.store, f'failed/{rank}')}"
                    )
            dead = self._dead_rank()
            if dead is not None:
                raise WorkerFailed(dead)
            if self.store.check([f"{stage}/{r}" for r in ranks]):
                return [_text(self.store, f"{stage}/{r}") for r in ranks]
            if time.monotonic() > deadline:
                missing = [r for r in ranks if not self.store.check([f"{stage}/{r}"])]
                raise WorkerFailed(
                    f"tensor-parallel ranks {missing} did not reach '{stage}' in {START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.05)

    def _dead_rank(self) -> str | None:
        """What became of the first rank process of this host that has exited, or None."""
        return next(iter(exited_ranks(self.procs, grace_s=0)), None)

    def _watch_ranks(self) -> None:
        while not self._closed:
            dead = self._dead_rank()
            if dead is not None and not self._closed:
                self._failed = dead
                logger.error(dead)
                return
            time.sleep(0.2)

    def health(self) -> str | None:
        return self._failed

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Checked and cached on the driver; every other rank reads the same folder when a step first puts
        the adapter in a slot (so on several hosts the path must exist on each)."""
        if self.worker.lora is None:
            raise ValueError("the engine was started without enable_lora")
        self.worker.lora.add(lora_request)

    def num_resident_loras(self) -> int:
        lora = self.worker.lora
        return 0 if lora is None else sum(slot is not None for slot in lora.slots)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        # NOTE: a rank process known to be gone fails the step before any collective: gloo does not always
        # notice a closed connection in time (a broadcast to a just-killed rank was seen to wait for ever)
        self._failed = self._failed or self._dead_rank()
        if self._failed is not None:
            raise WorkerFailed(self._failed)
        runner = self.worker.runner
        runner.sampler.forget(scheduler_output.finished_seq_ids)
        if not scheduler_output:
            return RunnerOutput()
        host = runner.inputs.build(scheduler_output)
        assert not host.pending, "tensor-parallel steps are scheduled synchronously (inputs all known)"
        lora = None
        if runner.lora is not None:
            runner.lora.prepare(scheduler_output)
            lora = LoRAStep(runner.lora.token_slots, runner.lora.take_slot_loads())
        try:
            send_step(host, self.steps, lora)
            sampled = runner.run(host, scheduler_output.sampled_seqs, grammar=scheduler_output.grammar)
            return sampled.output() if sampled is not None else RunnerOutput()
        except RuntimeError as e:  # a collective with a rank that went away
            dead = exited_ranks(self.procs, grace_s=RANK_EXIT_GRACE_S)
            raise WorkerFailed(self._failed or "; ".join(dead) or f"tensor-parallel step failed: {e}") from e

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._failed is None:
            try:
                send_step(None, self.steps)
            except RuntimeError:
                pass
        for proc in self.procs:
            try:
                proc.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                proc.process.kill()
            proc.process.wait()


def _text(store, key: str) -> str:
    return store.get(key).decode()


if __name__ == "__main__":
    main()
