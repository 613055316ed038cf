"""The LM runtime's compiled CPU kernels, built on first use:

- ``paged_attention.cpp``: decode attention read in place from the paged KV cache;
- ``q4_linear.cpp``: a linear layer on Q4_1 codes with AVX-512 BF16 dot products, for CPUs that
  have them (elsewhere it is absent and torch's int4 kernel runs);
- ``lora_bgmv.cpp``: many LoRA adapters over a batch's rows, each row with its own, in one call;
- ``decode_step.cpp``: a decode step through every layer in one call, and an output head on int8
  codes (AVX-512 BF16 CPUs only, like the Q4_1 layer; see :mod:`tasks.lm.fast_decode`).

``q4_tiles.h`` and ``paged_attention.h`` hold the loops the layer and the whole step share.

torch.utils.cpp_extension compiles them with this machine's compiler for this machine's CPU
(``-march=native``; about 15 s, once: the build is kept under ``TIERFLOW_KERNEL_CACHE``, default
``~/.cache/tierflow/kernels``, keyed by the sources, the flags, torch's version and the CPU).
Where they cannot be built (no C++ compiler, say) the model runs the same computations in plain
torch and :func:`kernel_status` says why; ``TIERFLOW_LM_KERNEL=0`` asks for plain torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("paged_attention.cpp", "q4_linear.cpp", "lora_bgmv.cpp", "decode_step.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("paged_attention.h", "q4_tiles.h")]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # fast-math: vectorized exp and sums
_status = {"kernel": "not loaded"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("TIERFLOW_KERNEL_CACHE", Path.home() / ".cache" / "tierflow" / "kernels"))


def build_folder() -> Path:
    """Where this machine's build of these sources, flags and torch is kept (its name is their hash)."""
    key = "\n".join([*(source.read_text() for source in SOURCES + HEADERS), " ".join(FLAGS), torch.__version__, _cpu_model()])
    return _cache_dir() / f"tierflow_kernels_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold the build folder's lock while torch builds or loads the kernels there.

    torch marks a build in progress with a ``lock`` file it removes when done; a build killed midway
    (Ctrl-C, a test's timeout, an out-of-memory kill) leaves it, and every later process then waits
    for it forever. Every build here first takes an ``flock`` on ``build.flock`` — which the kernel
    releases when its holder dies — so a ``lock`` file found while holding it was left by a dead build
    and is removed."""
    with open(build_dir / "build.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("removing %s, left by a kernel build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


@functools.cache
def _build():
    """The ``torch.ops.tierflow`` namespace once the kernels are loaded, or None where they cannot be built."""
    if os.environ.get("TIERFLOW_LM_KERNEL", "1") == "0":
        _status["kernel"] = "off (TIERFLOW_LM_KERNEL=0)"
        return None
    build_dir = build_folder()
    name = build_dir.name
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            load(name=name, sources=[str(source) for source in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                 build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only home: plain torch still works
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        telling = [line for line in lines if ("error" in line.lower() or "not found" in line)
                   and not line.startswith("Error building extension")]  # the compiler's own words
        reason = (telling or lines[-1:] or [type(error).__name__])[0]
        _status["kernel"] = f"unavailable ({reason}); plain torch runs instead"
        log.warning("LM kernels not built in %s: %s", build_dir, reason)
        return None
    has_q4 = hasattr(torch.ops.tierflow, "q4_linear")
    _status["kernel"] = (f"compiled ({build_dir}); Q4_1 linear on AVX-512 BF16: "
                         + ("yes" if has_q4 else "no, this CPU lacks it (torch's int4 kernel runs)"))
    return torch.ops.tierflow


def paged_decode_attention():
    """``torch.ops.tierflow.paged_decode_attention``, or None where the kernels cannot be built here."""
    ops = _build()
    return None if ops is None else ops.paged_decode_attention


def q4_linear():
    """``torch.ops.tierflow.q4_linear``, or None where it cannot be built or the CPU lacks AVX-512 BF16."""
    ops = _build()
    return ops.q4_linear if ops is not None and hasattr(ops, "q4_linear") else None


def lora_bgmv():
    """``torch.ops.tierflow.lora_bgmv``, or None where the kernels cannot be built here."""
    ops = _build()
    return None if ops is None else ops.lora_bgmv


def decode_layers():
    """``torch.ops.tierflow.decode_layers`` (every layer of a decode step in one call), or None where it
    cannot be built or the CPU lacks AVX-512 BF16."""
    ops = _build()
    return ops.decode_layers if ops is not None and hasattr(ops, "decode_layers") else None


def q8_linear():
    """``torch.ops.tierflow.q8_linear`` (a linear layer on int8 codes with a scale per 32 inputs), or None
    where it cannot be built or the CPU lacks AVX-512 BF16."""
    ops = _build()
    return ops.q8_linear if ops is not None and hasattr(ops, "q8_linear") else None


def kernel_status() -> str:
    """How the kernels run in this process: compiled (and which), off, or unavailable and why."""
    return _status["kernel"]
