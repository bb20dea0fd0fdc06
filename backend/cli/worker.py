"""`pagetron worker`: the tensor-parallel ranks of one more host, for an engine whose ranks span hosts.

    host 0 (the engine):  pagetron serve  --tensor-parallel-size 8 --nnodes 2 --dist-init-addr h0:29500
    host 1:               pagetron worker --tensor-parallel-size 8 --nnodes 2 --dist-init-addr h0:29500 \
                                          --node-rank 1

Each host runs tensor_parallel_size / nnodes ranks (one per GPU on CUDA); they meet the engine at
dist_init_addr (torch.distributed's TCP store on host 0; `host:port` or `tcp://host:port`, else
torch.distributed's MASTER_ADDR and MASTER_PORT; --node-rank defaults to NODE_RANK, as with torchrun)
and serve its steps until it stops. Start the
workers before or after the engine; the engine waits for them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    node_rank = os.environ.get("NODE_RANK")  # torchrun's name for it
    parser.add_argument(
        "--node-rank",
        type=int,
        required=node_rank is None,
        default=None if node_rank is None else int(node_rank),
        help="this host's index, 1 .. nnodes-1 (default: $NODE_RANK)",
    )


def run_worker(ns: argparse.Namespace, engine_args: dict) -> int:
    from pagetron.backend.core.config import EngineConfig
    from pagetron.backend.executor.multiproc import spawn_ranks

    config = EngineConfig.from_dict(engine_args)
    if config.nnodes < 2 or not 1 <= ns.node_rank < config.nnodes:
        print(
            f"pagetron worker: error: --node-rank must be in [1, {config.nnodes - 1}] with --nnodes >= 2 "
            "(host 0 runs the engine)",
            file=sys.stderr,
        )
        return 2
    addr = config.rendezvous_address()
    ranks = spawn_ranks(config, addr, ns.node_rank, first_in_process=False)
    joined = f"ranks {[r.rank for r in ranks]} joining {addr}"
    print(f"pagetron worker: host {ns.node_rank}: {joined}", file=sys.stderr, flush=True)

    def stop(*_) -> None:
        for r in ranks:
            r.process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [r.process.wait() for r in ranks]
    return max((abs(c) for c in codes), default=0)
