"""The compiled paged decode-attention kernel (paged_attention.cpp), built on first use.

torch.utils.cpp_extension compiles it with this machine's compiler for this machine's CPU
(``-march=native``; about 10 s, once: the build is kept under ``TIERFLOW_KERNEL_CACHE``, default
``~/.cache/tierflow/kernels``, keyed by the source, the flags, torch's version and the CPU).
Where it cannot be built (no C++ compiler, say) the model runs the same attention in plain torch
and :func:`kernel_status` says why; ``TIERFLOW_LM_KERNEL=0`` asks for plain torch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
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


@functools.cache
def paged_decode_attention():
    """``torch.ops.tierflow.paged_decode_attention``, or None where it cannot be built here."""
    if os.environ.get("TIERFLOW_LM_KERNEL", "1") == "0":
        _status["kernel"] = "off (TIERFLOW_LM_KERNEL=0)"
        return None
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), torch.__version__, _cpu_model()])
    name = f"tierflow_paged_attention_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    build_dir = _cache_dir() / name
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_dir.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only home: plain torch still works
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        telling = [line for line in lines if ("error" in line.lower() or "not found" in line)
                   and not line.startswith("Error building extension")]  # the compiler's own words
        reason = (telling or lines[-1:] or [type(error).__name__])[0]
        _status["kernel"] = f"unavailable ({reason}); attention runs in plain torch"
        log.warning("paged attention kernel not built in %s: %s", build_dir, reason)
        return None
    _status["kernel"] = f"compiled ({build_dir})"
    return torch.ops.tierflow.paged_decode_attention


def kernel_status() -> str:
    """How decode attention runs in this process: compiled, off, or unavailable and why."""
    return _status["kernel"]
