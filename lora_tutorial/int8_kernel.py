"""The int8 decoding kernel: ``int8_matvec.c``, compiled on first use and called through ctypes.

The same library holds ``decode_block.c``: a whole decoding step of one block built on these products,
which ``decode_step.py`` calls, and the pieces of that step on their own, which ``glued_blocks.py`` calls
between PyTorch's products when a bf16 model generates. (So a bf16 model builds the library too.)

Decoding one sequence multiplies each int8 weight matrix by one activation row, so its speed is how fast
the weights stream in from memory. PyTorch's ``_weight_int8pack_mm`` streams them well below the
memory bandwidth of the project's VM; the C next to this file gets much closer (it asks for the weights
8 KiB before it needs them -- see its comment). ``bench/kernels.json`` and ``bench/decode_breakdown.json``
measure both.

The kernel is compiled once per machine with the system C compiler (``cc``, or ``$CC``) for this CPU
(``-march=native``) into the weight cache folder, under a name that hashes the source, the flags and the
CPU, so that a changed kernel or a cache shared between different machines never loads a stale build.
Where that is not possible (no compiler, a CPU without AVX-512, not Linux), or with
``LORA_TUTORIAL_INT8_KERNEL=torch`` in the environment, ``int8_matmul`` returns None and the caller uses
PyTorch's kernel: results agree to bf16 rounding either way. ``kernel_name()`` says which one runs.

A decoding step of many sequences is bound by arithmetic instead (each weight is multiplied once per
row). On a CPU with AMX (Intel Sapphire Rapids and later), products of ``AMX_MIN_ROWS`` (5) to 16 rows
widen the int8 weights to bf16 once and multiply them on the matrix unit instead of with AVX-512 FMAs: at
16 rows one pass over the model's int8 matrices takes well under half the time (``bench/kernels.json``:
``amx_ms`` against ``fma_ms``). The two paths round alike but add in another order, so an int8 result
can differ in its last bf16 bit between a batch of 4 rows and one of 5. ``use_amx`` moves the threshold
or switches AMX off (benchmarks and tests compare the two).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import torch

from .files import atomic_path
from .precision import cpu_has_avx512
from .pretrained import cache_dir

# The int8 products, and a block's decoding step and its pieces (decode_step.py, glued_blocks.py): one library.
SOURCES = (Path(__file__).with_name("int8_matvec.c"), Path(__file__).with_name("decode_block.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 16  # the most rows the kernel takes (a decoding step of 16 sequences); more: PyTorch's bf16 products
# Products of this many rows or more run on AMX where the CPU has it: by hand and in bench/kernels.json
# (`amx_ms` against `fma_ms`), the FMA loop is faster up to 4 rows and AMX from 5.
AMX_MIN_ROWS = 5
log = logging.getLogger(__name__)


def int8_matmul(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``x @ (weight_int8 * scale[:, None]).T`` in bf16 for a bf16 CPU ``x`` (..., in) of at most ``MAX_ROWS``
    rows, or None when the compiled kernel cannot run here (see ``kernel_name``); ``scale``: bf16, one per row.

    Called once per weight matrix and decoding step, so it checks only what the C code relies on.
    """
    lib = library()
    out_features, in_features = weight_int8.shape
    rows = x.numel() // in_features
    if lib is None or rows > MAX_ROWS:
        return None
    if x.shape[-1] != in_features or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"int8_matmul: expected x of shape (..., {in_features}), bf16, on the CPU; "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    if not (weight_int8.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (out_features,)
            and weight_int8.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"int8_matmul: expected a contiguous int8 matrix and {out_features} contiguous bf16 "
                         f"scales; got {weight_int8.dtype} and {tuple(scale.shape)} {scale.dtype}")
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], out_features), dtype=torch.bfloat16, device="cpu")
    lib.int8_matmul(x.data_ptr(), weight_int8.data_ptr(), scale.data_ptr(), y.data_ptr(),
                    rows, in_features, out_features, torch.get_num_threads())
    return y


def kernel_name() -> str:
    """Which kernel ``Int8Linear`` uses for decoding here, and why (for logs and benchmark records)."""
    lib, reason = _library()
    if lib is None:
        return f"PyTorch _weight_int8pack_mm ({reason})"
    rows = lib.int8_amx_min_rows()
    return "int8_matvec.c (compiled for this CPU" + (f", AMX for {rows}-{MAX_ROWS} rows)" if rows else ")")


def use_amx(min_rows: int = AMX_MIN_ROWS) -> int:
    """Let products of ``min_rows`` to ``MAX_ROWS`` rows run on AMX (from the first use: ``AMX_MIN_ROWS``),
    or none of them with 0; for benchmarks and tests that compare the two paths. Returns the threshold now
    in effect: 0 where AMX is off or cannot run here (no compiled kernel, no AMX, Linux refused it)."""
    if not 0 <= min_rows <= MAX_ROWS:
        raise ValueError(f"use_amx: min_rows must be 0 (off) to {MAX_ROWS}, got {min_rows}")
    lib = library()
    return 0 if lib is None else lib.int8_amx_set(min_rows)


def library() -> ctypes.CDLL | None:
    """The compiled library (``int8_matmul`` and ``decode_block``), or None where it cannot run here."""
    return _library()[0]


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel (built on the first call of a process), or None and the reason it cannot be."""
    reason = _unsupported()
    if reason:
        log.info("int8 kernel: using PyTorch's (%s)", reason)
        return None, reason
    try:
        lib = _load(_build())
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip()
        log.warning("int8 kernel: could not build %s, using PyTorch's: %s", " + ".join(s.name for s in SOURCES),
                    detail[-1000:])
        errors = [line for line in detail.splitlines() if "error" in line.lower()]
        return None, f"the build failed: {(errors or detail.splitlines() or [type(error).__name__])[0]}"
    lib.int8_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.int8_matmul.restype = None
    lib.int8_amx_set.argtypes = [ctypes.c_int]  # min_rows (0: off)
    lib.int8_amx_set.restype = ctypes.c_int  # the threshold in effect: 0 unless Linux granted the tile registers
    lib.int8_amx_min_rows.restype = ctypes.c_int
    lib.int8_amx_calls.restype = ctypes.c_int64  # how many products ran on AMX so far in this process
    lib.int8_amx_set(AMX_MIN_ROWS)
    # decode_block(tensors, sizes, eps, x, rows, positions, column, visible, cos, sin_signed, threads)
    lib.decode_block.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 3, ctypes.c_int]
    lib.decode_block.restype = ctypes.c_int  # 0, or 1: out of memory
    # The same pieces between PyTorch's products (glued_blocks.py)
    P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.add_and_norm.argtypes = [P, P, P, F32, I64, I64, P, INT]  # x, y, weight, eps, rows, d, out, threads
    lib.add_and_norm.restype = None
    # qkv, keys, values, sizes, rows, positions, column, visible, cos, sin_signed, out, threads
    lib.attention_of_step.argtypes = [P, P, P, P, I64, P, I64, P, P, P, P, INT]
    lib.attention_of_step.restype = ctypes.c_int  # 0, or 1: out of memory
    # qkv, keys, values, sizes, batch, length, positions, start, cos, sin_signed, threads
    lib.rope_and_cache.argtypes = [P, P, P, P, I64, I64, P, I64, P, P, INT]
    lib.rope_and_cache.restype = None
    lib.swiglu_all.argtypes = [P, I64, I64, P, INT]  # gate_up, rows, ff, out, threads
    lib.swiglu_all.restype = None
    return lib, ""


def _load(library: Path) -> ctypes.CDLL:
    """Load a built kernel; a file that does not load (cut short by a crash, say) is built again once."""
    try:
        return ctypes.CDLL(str(library))
    except OSError:
        library.unlink(missing_ok=True)
        return ctypes.CDLL(str(_build()))


def _unsupported() -> str:
    """Why the compiled kernel cannot be used here, or "" when it can."""
    if os.environ.get("LORA_TUTORIAL_INT8_KERNEL", "").lower() == "torch":
        return "LORA_TUTORIAL_INT8_KERNEL=torch"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
    if not cpu_has_avx512():
        return "the CPU lacks AVX-512 (F, BW, VL)"
    if shutil.which(_compiler()[0]) is None:
        return f"no C compiler ({_compiler()[0]!r} not found; set CC)"
    return ""


def _build() -> Path:
    """Compile the kernel into the cache folder unless this exact build is there already; return its path."""
    compiler = _compiler()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    parts = [*(source.read_text() for source in SOURCES), " ".join(FLAGS), " ".join(compiler), version, _cpu_flags()]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    library = cache_dir() / f"int8_matvec-{key}.so"
    if not library.exists():
        with atomic_path(library) as tmp:  # concurrent first uses each build, and one rename wins
            subprocess.run([*compiler, *FLAGS, *map(str, SOURCES), "-o", str(tmp)], check=True, capture_output=True,
                           text=True, timeout=300)
    return library


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry arguments, as in "ccache gcc") or ``cc``."""
    return shlex.split(os.environ.get("CC", "cc")) or ["cc"]


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them ("" elsewhere): part of the build's name, since
    ``-march=native`` builds for exactly this CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


__all__ = ["AMX_MIN_ROWS", "MAX_ROWS", "int8_matmul", "kernel_name", "library", "use_amx"]
