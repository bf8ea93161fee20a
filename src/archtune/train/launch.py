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

SIGTERM / SIGINT to this process (a scheduler stopping the job): torchrun's agent passes it on
to the workers, which finish the step, save one checkpoint and exit 75 (train/guards.py); the
agent then no longer reports their exit codes, so each worker leaves its code in a folder this
process names (EXIT_STATUS_ENV), and this process exits 75 when every worker of its node did.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
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


NODE0_PLACEHOLDER = "NODE0_ADDR"  # shown for --master-addr in a layout printed without one
MULTI_NODE_PORT = 29500  # torchrun's default port on node 0


def node_layout(config: Path, overrides: list[str], *, nproc: int, nnodes: int = 1, master_addr: str | None = None,
                master_port: int | None = None) -> list[dict]:
    """What each node of a run runs, node 0 first: its global ranks (torchrun's static rendezvous
    numbers node R's processes R*nproc .. R*nproc+nproc-1), the `archtune train` line to run there
    and the same as a `torchrun` line, the rank that prepares the data on that node (its local
    rank 0: nodes need no shared disk) and, on node 0, the rank that writes outputs (global rank 0)."""
    import shlex

    from archtune.train.distributed import MAIN_RANK, PREPARING_LOCAL_RANK

    several = nnodes > 1
    addr = master_addr or (NODE0_PLACEHOLDER if several else None)
    port = master_port if master_port is not None else (MULTI_NODE_PORT if several else None)
    torchrun_argv(config, overrides, nproc=nproc, nnodes=nnodes, master_addr=addr)  # refuses a bad world
    nodes = []
    for node in range(nnodes):
        torchrun = torchrun_argv(config, overrides, nproc=nproc, nnodes=nnodes, node_rank=node, master_addr=addr,
                                 master_port=port)
        archtune = ["archtune", "train", str(config)]
        if nproc > 1 or several:
            archtune += ["--nproc", str(nproc)]
        if several:
            archtune += ["--nnodes", str(nnodes), "--node-rank", str(node), "--master-addr", addr,
                         "--master-port", str(port)]
        archtune += overrides
        ranks = list(range(node * nproc, (node + 1) * nproc))
        nodes.append({
            "node_rank": node,
            "global_ranks": ranks,
            "command": shlex.join(archtune),
            "torchrun": shlex.join(["torchrun", *torchrun]),
            "prepares_data": ranks[PREPARING_LOCAL_RANK],
            "writes_outputs": MAIN_RANK if MAIN_RANK in ranks else None,
        })
    return nodes


EXIT_STATUS_ENV = "ARCHTUNE_EXIT_STATUS_DIR"  # where each worker of `launch` leaves its exit code


def launch(config: Path, overrides: list[str], **kwargs) -> int:
    """Run the workers to completion; the exit code of the first failed worker (0 when all succeed).
    Stopped by a signal: 75 when every worker of this node stopped with a checkpoint (exit 75)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(torchrun_argv(config, overrides, **kwargs))
    with tempfile.TemporaryDirectory(prefix="archtune-exit-codes-") as exits:
        os.environ[EXIT_STATUS_ENV] = exits  # the workers inherit this process's environment
        try:
            run(args)
        except ChildFailedError as exc:
            failed_rank, failure = exc.get_first_failure()
            code = failure.exitcode
            print(f"archtune: worker rank {failed_rank} failed (exit code {code})", file=sys.stderr)
            # A worker's own exit code (2: user error) passes through; a signal becomes 1.
            return code if isinstance(code, int) and code > 0 else 1
        except SignalException as exc:
            return stopped_by_signal(exc.sigval, worker_exit_codes(Path(exits)), int(args.nproc_per_node))
        finally:
            os.environ.pop(EXIT_STATUS_ENV, None)
    return 0


def record_exit(code: int) -> None:
    """In a worker of `launch`: leave this process's exit code for it (else nothing)."""
    folder = os.environ.get(EXIT_STATUS_ENV)
    if not folder:
        return
    from archtune.train import distributed

    try:
        Path(folder, f"attempt{distributed.restart_count()}-rank{distributed.rank()}").write_text(str(code))
    except OSError:  # the launcher is gone (its folder with it): nobody to tell
        pass


def worker_exit_codes(folder: Path) -> dict[int, int]:
    """rank -> exit code, as the workers of the latest torchrun attempt left them in `folder`."""
    found: dict[int, dict[int, int]] = {}
    for path in folder.glob("attempt*-rank*"):
        attempt, _, rank = path.name.removeprefix("attempt").partition("-rank")
        found.setdefault(int(attempt), {})[int(rank)] = int(path.read_text())
    return found[max(found)] if found else {}


def stopped_by_signal(sig: int, codes: dict[int, int], nproc: int) -> int:
    """This node's exit code once torchrun passed `sig` on to its `nproc` workers and they ended
    (`codes`: rank -> exit code of those that said): 75 when all stopped with a checkpoint, else
    128 + the signal, as a process ended by it."""
    from archtune.train.guards import EXIT_STOPPED

    name = signal.Signals(sig).name
    ranks = ", ".join(map(str, sorted(codes)))
    if len(codes) == nproc and all(code == EXIT_STOPPED for code in codes.values()):
        print(f"archtune: {name}: every worker of this node (rank {ranks}) stopped after the same step and exited "
              f"{EXIT_STOPPED}; run the same command with resume_from_checkpoint: true to continue", file=sys.stderr)
        return EXIT_STOPPED
    said = [f"rank {r} exited {code}" for r, code in sorted(codes.items())]
    missing = nproc - len(codes)
    if missing:
        said.append(f"{missing} ended without an exit code (stopped at once by torchrun after its shutdown timeout, "
                    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT, or lost)")
    print(f"archtune: {name}: torchrun stopped the workers of this node: {'; '.join(said)}", file=sys.stderr)
    return 128 + int(sig)
