"""CPU threads for torch on a machine other jobs share.

* ``available_cpus()``: the CPUs this process may run on (``os.sched_getaffinity``: a container's or
  ``taskset``'s limit), not ``os.cpu_count()`` (the machine's).
* ``passive_wait()``: ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy. OpenMP reads it once,
  when torch's OpenMP runtime loads, so it is effective only if called before ``import torch``
  (``passive_wait`` says whether it was). With the default (active) policy a thread that reaches a
  barrier spins for a while; when another process holds one of the cores, the spinning thread and the
  one it waits for share that core and a GPTQ layer took 2-4x the quiet time
  (``benchmarks/gptq_speed.py``, results in ``docs/quantizer.md``, Speed).
* ``choose_threads(requested)``: an explicit request wins; else ``OMP_NUM_THREADS`` if set; else the
  available CPUs.
"""

from __future__ import annotations

import os
import sys


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def passive_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy. -> True if torch is not loaded yet
    (so the policy in the environment is the one OpenMP will use); False if it came too late."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def choose_threads(requested: int | None = None) -> int:
    """-> the thread count to use: ``requested`` (> 0), else OMP_NUM_THREADS, else available_cpus()."""
    if requested is not None and requested < 0:
        raise ValueError(f"threads must be >= 0, got {requested}")
    if requested:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), available_cpus())
    return available_cpus()


def set_threads(requested: int | None = None) -> int:
    """torch.set_num_threads(choose_threads(requested)); -> the count set."""
    import torch

    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


#: the device types quantize, eval and generate accept (``--device``)
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(spec=None):
    """``--device`` -> a torch.device: ``cpu`` (the default, also for None or ""), ``cuda`` or ``cuda:N``.
    A device torch does not see is refused with a QuantError that says why and what to do, before any work
    is done (nothing is written)."""
    import torch

    from .errors import QuantError

    if spec is None or str(spec).strip() == "":
        return torch.device("cpu")
    try:
        dev = torch.device(str(spec).strip() if not isinstance(spec, torch.device) else spec)
    except (RuntimeError, ValueError):
        raise QuantError(f"--device {spec!r}: not a device torch knows; give one of cpu, cuda, cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise QuantError(f"--device {spec}: only {', '.join(DEVICE_TYPES)} are supported (the integer path needs "
                         f"exact int64 and float64 arithmetic); give cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU-only build)"
            raise QuantError(f"--device {spec}: torch sees no CUDA device (torch {torch.__version__}, CUDA "
                             f"{built}); run with --device cpu, or install a CUDA build of torch on a machine "
                             f"with a GPU")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise QuantError(f"--device {spec}: there {'is' if n == 1 else 'are'} only {n} CUDA "
                             f"device{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1})")
    return dev
