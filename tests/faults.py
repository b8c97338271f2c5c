"""Benches that fail on purpose, run as `bench.name=faults:<name>` with this folder on PYTHONPATH, to test
that a sweep survives each way a point's process can die."""

import ctypes
import os
import signal


def segfault(ctx):
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def exit_now(ctx):
    os._exit(3)


def sigkill(ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def hog(ctx):
    blocks = []
    while True:
        blocks.append(bytearray(64 * 2**20))


def sleepy(ctx):
    import time

    time.sleep(60)


def kill_server(ctx):
    """engine=openai with a launched server: the server dies in the middle of the point."""
    server = ctx.engine.remote.server
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    from runners.benches import smoke

    return smoke.run(ctx)


def fail_on_rank_1(ctx):
    """A model split over ranks: rank 1 fails while rank 0 waits for it in a collective call (as a rank that runs
    out of memory mid-generation leaves the others)."""
    from harness import parallel

    if parallel.rank() == 1:
        raise ValueError("rank 1 gave up on purpose")
    parallel.gather("rank 0 waits here")
