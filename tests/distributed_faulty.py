"""`convc train` with a fault planted in one rank, for tests/test_distributed.py.

    mpirun -n 2 python tests/distributed_faulty.py RANK STEP ACTION train FILE [options]

At step STEP (while computing its shard's gradient) rank RANK raises a
RuntimeError (ACTION raise), kills itself with SIGKILL (kill), or stops
answering (hang: it sleeps). Every other rank runs `convc train` unchanged.
"""
import os
import signal
import sys
import time


def main() -> int:
    rank, step, action = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from mpi4py import MPI

    from convc import cli
    from convc.runtime import train as T

    if MPI.COMM_WORLD.Get_rank() == rank:
        shard_grad = T._Trainer._shard_grad

        def planted(self, *args, **kwargs):
            if self.step + 1 == step:
                if action == "raise":
                    raise RuntimeError(f"planted fault in rank {rank} at step {step}")
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "hang":
                    time.sleep(3600)
            return shard_grad(self, *args, **kwargs)

        T._Trainer._shard_grad = planted
    return cli.main(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
