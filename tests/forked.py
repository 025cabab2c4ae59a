"""Forked test ranks that cannot hang the suite.

A forked process that ran gloo collectives can block for good in the process group's C++
destructor (seen on an idle 2-core machine: one rank of four hundred stuck joining a gloo
thread after destroy_process_group). The suite then waits forever at exit for that child. Here
each rank leaves with os._exit as soon as its work is done, skipping the interpreter's teardown
(a target that calls a script's train() leaves from its common.cleanup, before train() frees the
DDP model), and whatever is still alive at the deadline is killed."""
import multiprocessing
import os
import sys
import time
import traceback


def _rank(target, args):
    code, kept = 0, None
    try:
        kept = target(*args)  # what the target returns (a DDP model, say) is held until exit
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # kept is never destroyed


def run_forked(target, args_per_rank, timeout=120):
    """Run target(*args) in one forked process per entry; return their exit codes (None where a
    process was still running at the deadline and had to be killed)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(target, args)) for args in args_per_rank]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes
