"""`archtune train CONFIG --nproc N`: start N worker processes with torch's own launcher.

The workers are `python -m archtune train CONFIG [overrides]` started by torch.distributed.run
(torchrun) in-process, not through a shell string: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, the worker sees WORLD_SIZE and trains as one rank. Running
`torchrun --nproc-per-node N -m archtune train CONFIG` yourself is the same thing.

Single node: a free port is picked (several runs may share a machine). Several nodes: every
node runs the same command with its `--node-rank`, and `--master-addr` / `--master-port` name
node 0 (torchrun's static rendezvous).

`--max-restarts N`: when a worker dies (a lost process, an out-of-memory kill), torchrun stops the
others and starts the whole group again, up to N times; the restarted workers continue from the
run's last complete checkpoint (train/lifecycle.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from archtune.errors import UserError


def torchrun_argv(config: Path, overrides: list[str], *, nproc: int, nnodes: int = 1, node_rank: int = 0,
                  master_addr: str | None = None, master_port: int | None = None, max_restarts: int = 0,
                  debug: bool = False) -> list[str]:
    """torchrun's arguments for the workers of `archtune train CONFIG OVERRIDES`."""
    if nproc < 1:
        raise UserError.single("--nproc", f"--nproc must be at least 1, not {nproc}", "use --nproc 1 or more")
    if nnodes < 1:
        raise UserError.single("--nnodes", f"--nnodes must be at least 1, not {nnodes}", "use --nnodes 1 or more")
    if not 0 <= node_rank < nnodes:
        raise UserError.single("--node-rank", f"--node-rank {node_rank} is not in 0..{nnodes - 1}",
                               "number the nodes 0 (the master) to --nnodes - 1")
    if nnodes > 1 and not master_addr:
        raise UserError.single("--master-addr", "several nodes need the address of node 0",
                               "pass --master-addr HOST (and the same --master-port) on every node")
    if max_restarts < 0:
        raise UserError.single("--max-restarts", f"--max-restarts must be 0 or more, not {max_restarts}",
                               "use --max-restarts 0 (no restart) or more")
    argv = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--node-rank", str(node_rank)]
    if max_restarts:
        argv += ["--max-restarts", str(max_restarts)]
    if master_addr:
        argv += ["--master-addr", master_addr]
    if master_port is not None:
        argv += ["--master-port", str(master_port)]
    argv += ["-m", "archtune"] + (["--debug"] if debug else []) + ["train", str(config), *overrides]
    return argv


def launch(config: Path, overrides: list[str], **kwargs) -> int:
    """Run the workers to completion; the exit code of the first failed worker (0 when all succeed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(torchrun_argv(config, overrides, **kwargs))
    try:
        run(args)
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode
        print(f"archtune: worker rank {failed_rank} failed (exit code {code})", file=sys.stderr)
        # A worker's own exit code (2: user error) passes through; a signal becomes 1.
        return code if isinstance(code, int) and code > 0 else 1
    return 0
