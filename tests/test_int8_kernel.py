"""The compiled int8 decoding kernel: the reference formula and PyTorch's kernel agree with it, and a
machine where it cannot be built falls back to PyTorch's kernel instead of failing.

The kernel's own arithmetic is tested where it runs (x86-64 Linux with AVX-512 F/BW/VL and a C compiler,
as the project's machine and its CI); elsewhere those tests are skipped and the fallback tests run. Its
AMX path (products of 5-16 rows) is tested where the CPU has AMX and Linux grants the tile registers, as
on the project's machine; a counter in the library shows which path each product took."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lora_tutorial import int8_kernel
from lora_tutorial.int8_kernel import MAX_ROWS, int8_matmul, kernel_name
from lora_tutorial.quantize import Int8Linear

# Where the CPU or the toolchain cannot run the kernel, the fallback tests below still run; only the tests
# of the kernel's own arithmetic are skipped, and they say why.
UNSUPPORTED = int8_kernel._unsupported()
needs_kernel = pytest.mark.skipif(bool(UNSUPPORTED), reason=f"int8 kernel unsupported here: {UNSUPPORTED}")


def quantized(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = (torch.rand(out_features, generator=generator) * 0.02 + 1e-3).to(torch.bfloat16)
    return q, scale


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition, in float64: x @ (q * scale)^T."""
    return x.double() @ (q.double() * scale.double()[:, None]).T


def within_rounding(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether y is the definition up to the bf16 rounding of the result, plus float32 rounding of the sum
    (which matters only near zero)."""
    exact = reference(x, q, scale)
    magnitude = x.double().abs() @ (q.double().abs() * scale.double()[:, None]).T
    return bool(((y.double() - exact).abs() <= exact.abs() * 2**-8 + magnitude * x.shape[-1] * 2**-24).all())


@needs_kernel
def test_the_kernel_builds_here():
    assert kernel_name().startswith("int8_matvec.c")


@needs_kernel
@pytest.mark.parametrize("rows, in_features, out_features", [
    (1, 576, 960),   # the model's QKV projection at batch 1
    (1, 1536, 576),  # its MLP down projection
    (4, 576, 3072),
    (16, 64, 36),    # the most rows the kernel takes
    (3, 33, 7),      # a width that is not a multiple of 16 and a row count that is not one of 4
    (2, 5, 1),
])
def test_kernel_matches_the_definition(rows, in_features, out_features):
    q, scale = quantized(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = int8_matmul(x, q, scale)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    assert within_rounding(y, x, q, scale)


@needs_kernel
def test_kernel_agrees_with_pytorchs_int8_kernel_and_keeps_leading_dimensions():
    q, scale = quantized(960, 576)
    x = torch.randn(2, 1, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ours = int8_matmul(x, q, scale)
    assert ours.shape == (2, 1, 960)
    theirs = torch.ops.aten._weight_int8pack_mm(x.reshape(2, 576), q, scale).reshape(2, 1, 960)
    # two correct roundings of nearly the same float32 sum: equal, or one bf16 step apart
    assert ((ours.float() - theirs.float()).abs() <= theirs.float().abs() * 2**-7 + 1e-6).all()
    assert (ours == theirs).float().mean() > 0.9


@needs_kernel
def test_kernel_reads_a_non_contiguous_input_as_its_values():
    q, scale = quantized(8, 32)
    x = torch.randn(32, 3).to(torch.bfloat16).T  # (3, 32), transposed view
    assert torch.equal(int8_matmul(x, q, scale), int8_matmul(x.contiguous(), q, scale))


def test_more_rows_than_the_kernel_takes_return_none():
    q, scale = quantized(8, 32)
    assert int8_matmul(torch.zeros(MAX_ROWS + 1, 32, dtype=torch.bfloat16), q, scale) is None


@needs_kernel
@pytest.mark.parametrize("x, expected", [
    (torch.zeros(1, 64, dtype=torch.bfloat16), r"expected x of shape \(\.\.\., 32\), bf16, on the CPU; got \(1, 64\)"),
    (torch.zeros(2, 32), r"got \(2, 32\) torch.float32"),
])
def test_a_wrong_input_is_one_clear_error_not_a_write_out_of_bounds(x, expected):
    q, scale = quantized(8, 32)
    with pytest.raises(ValueError, match=expected):
        int8_matmul(x, q, scale)
    with pytest.raises(ValueError, match="8 contiguous bf16 scales"):
        int8_matmul(torch.zeros(1, 32, dtype=torch.bfloat16), q, scale[:4])


def test_int8_linear_passes_gradients_to_its_input(monkeypatch):
    calls = []
    monkeypatch.setattr("lora_tutorial.quantize.int8_matmul", lambda *a: calls.append(a))
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(32, 8, bias=False))
    x = torch.randn(1, 32, requires_grad=True)
    y = layer(x)  # neither int8 kernel has a backward: the differentiable path must run
    y.float().sum().backward()
    assert calls == [] and x.grad is not None
    expected = layer.dequantized().float().sum(0)  # d(sum of outputs)/dx, up to the bf16 of the backward pass
    assert (x.grad - expected).abs().max() <= 2**-6 * expected.abs().max()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **env})


# A fresh process (the kernel is chosen once per process): which kernel runs, and what one layer returns.
PROBE = """
import json, torch
from torch import nn
from lora_tutorial.int8_kernel import kernel_name
from lora_tutorial.quantize import Int8Linear
torch.manual_seed(0)
layer = Int8Linear(nn.Linear(64, 32, bias=False))
x = torch.randn(1, 64).to(torch.bfloat16)
with torch.no_grad():
    y = layer(x)
theirs = torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.scale)
print(json.dumps({"kernel": kernel_name(), "same_as_pytorch": bool(torch.equal(y, theirs))}))
"""


def test_the_environment_can_choose_pytorchs_kernel(tmp_path):
    out = run_python(PROBE, LORA_TUTORIAL_INT8_KERNEL="torch", LORA_TUTORIAL_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"kernel": "PyTorch _weight_int8pack_mm (LORA_TUTORIAL_INT8_KERNEL=torch)",
                      "same_as_pytorch": True}


def test_a_failed_build_falls_back_to_pytorchs_kernel(tmp_path):
    failing = tmp_path / "cc"  # writes half an output file, then fails as a compiler would
    failing.write_text('#!/bin/sh\nfor a; do [ "$prev" = "-o" ] && echo partial > "$a"; prev="$a"; done\n'
                       "echo 'cc: error: no such compiler here' >&2\nexit 1\n")
    failing.chmod(0o755)
    out = run_python(PROBE, CC=str(failing), LORA_TUTORIAL_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["same_as_pytorch"] is True
    if not UNSUPPORTED:  # with AVX-512 it tried to build, failed, and says so
        assert result["kernel"] == "PyTorch _weight_int8pack_mm (the build failed: cc: error: no such compiler here)"
        assert "could not build int8_matvec.c" in out.stderr
    assert not list((tmp_path / "cache").glob("*int8_matvec*"))  # nothing half-built left behind


@needs_kernel
def test_the_build_is_cached_under_a_name_that_changes_with_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TUTORIAL_CACHE", str(tmp_path))
    first = int8_kernel._build()
    assert first.parent == tmp_path and first.exists()
    products, block = int8_kernel.SOURCES
    modified = tmp_path / block.name  # a change to either source makes another build
    modified.write_text(block.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(int8_kernel, "SOURCES", (products, modified))
    second = int8_kernel._build()
    assert second != first and second.exists()
    stamp = second.stat().st_mtime_ns
    assert int8_kernel._build() == second and second.stat().st_mtime_ns == stamp  # reused, not rebuilt


needs_amx = pytest.mark.skipif(bool(UNSUPPORTED) or "AMX" not in kernel_name(),
                               reason="no AMX here (CPU, kernel build or Linux permission)")


def amx_calls() -> int:
    """How many products this process has computed on AMX so far."""
    return int8_kernel.library().int8_amx_calls()


@needs_amx
@pytest.mark.parametrize("rows, in_features, out_features", [
    (16, 576, 960),    # a decoding step of 16 rows through the QKV projection
    (16, 1536, 576),   # and through the MLP down projection
    (5, 576, 3072),    # fewer rows than a tile holds: the rest of the tile is zeros, not written out
    (5, 32, 16),       # the fewest rows that use it: one group of 16 weight rows, one tile of 32 inputs
    (7, 96, 48),       # an odd number of 32-input tiles, three groups
])
def test_amx_products_match_the_definition_and_run_another_path(rows, in_features, out_features):
    q, scale = quantized(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    before = amx_calls()
    try:
        with_amx = int8_matmul(x, q, scale)
        assert amx_calls() == before + 1
        assert int8_kernel.use_amx(0) == 0
        with_fma = int8_matmul(x, q, scale)
        assert amx_calls() == before + 1
    finally:
        int8_kernel.use_amx()
    assert within_rounding(with_amx, x, q, scale)
    # the two paths add the same exact products in another order: nearly always the same bf16 result
    assert (with_amx == with_fma).float().mean() > 0.99


@needs_amx
@pytest.mark.parametrize("rows, in_features, out_features", [
    (16, 64, 40),   # 40 weight rows: not a multiple of 16
    (16, 48, 16),   # 48 inputs: not a multiple of 32 (a tile would read past the end of each row)
    (4, 64, 64),    # fewer rows than AMX_MIN_ROWS
])
def test_amx_is_not_used_for_shapes_it_does_not_take(rows, in_features, out_features):
    q, scale = quantized(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    before = amx_calls()
    y = int8_matmul(x, q, scale)
    assert amx_calls() == before and within_rounding(y, x, q, scale)


@needs_amx
def test_the_amx_threshold_can_be_moved_and_switched_off():
    assert kernel_name() == f"int8_matvec.c (compiled for this CPU, AMX for {int8_kernel.AMX_MIN_ROWS}-16 rows)"
    q, scale = quantized(32, 64)
    one_row = torch.randn(1, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    before = amx_calls()
    try:
        assert int8_kernel.use_amx(1) == 1
        assert within_rounding(int8_matmul(one_row, q, scale), one_row, q, scale)
        assert amx_calls() == before + 1
        assert int8_kernel.use_amx(0) == 0
        assert kernel_name() == "int8_matvec.c (compiled for this CPU)"
        int8_matmul(one_row.expand(16, 64), q, scale)
        assert amx_calls() == before + 1
        with pytest.raises(ValueError, match="min_rows must be 0 .off. to 16, got 17"):
            int8_kernel.use_amx(17)
    finally:
        int8_kernel.use_amx()
    assert kernel_name().endswith("AMX for 5-16 rows)")


@needs_amx
def test_amx_writes_only_the_rows_it_was_given():
    """y is exactly rows x out: a write past it would corrupt the heap unseen, so call the library on a
    larger buffer and check that what lies after y is untouched."""
    rows, in_features, out_features = 5, 64, 32
    q, scale = quantized(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    sentinel = -12345.0
    buffer = torch.full((16, out_features), sentinel, dtype=torch.bfloat16)
    before = amx_calls()
    int8_kernel.library().int8_matmul(x.data_ptr(), q.data_ptr(), scale.data_ptr(), buffer.data_ptr(),
                                      rows, in_features, out_features, 2)
    assert amx_calls() == before + 1
    assert within_rounding(buffer[:rows], x, q, scale)
    assert (buffer[rows:] == sentinel).all()


@needs_amx
def test_pytorchs_bf16_work_on_amx_is_unchanged_by_ours_between_them():
    """oneDNN (products) and PyTorch's flash attention multiply bf16 on the same tile registers, on both
    threads: their results before and after one of our products are the same bits. (With today's
    torch both configure the tiles on every call, so this passes even if ours did not release them --
    checked; it guards against a version that caches its configuration, not our release.)"""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(1536, 576, generator=generator).to(torch.bfloat16)
    xs = [torch.randn(rows, 576, generator=generator).to(torch.bfloat16) for rows in (16, 700)]
    qkv = [torch.randn(4, 9, 300, 64, generator=generator).to(torch.bfloat16) for _ in range(3)]

    def theirs() -> list[torch.Tensor]:
        products = [torch.nn.functional.linear(x, weight) for x in xs]
        return [*products, torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)]

    before = theirs()
    q, scale = quantized(960, 576)
    count = amx_calls()
    for x in xs:
        int8_matmul(x[:16], q, scale)
        assert all(torch.equal(a, b) for a, b in zip(theirs(), before))
    assert amx_calls() == count + 2
