"""The compiled extension: built (with CUDA objects whenever nvcc is present), and reported by build_info."""
import shutil

import pytest

import fastsplit


def test_extension_builds_its_cpu_kernels():
    assert fastsplit.build_info()["native_cpu"], "fastsplit._C did not build or import"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_objects_built_when_nvcc_is_present():
    info = fastsplit.build_info()
    assert info["cuda_kernels_compiled"], "nvcc is present but the extension has no CUDA kernels"
    assert info["cuda_archs"], info


@pytest.mark.gpu
def test_compute_sanitizer_memcheck_is_clean(tmp_path):
    import subprocess
    import sys

    if shutil.which("compute-sanitizer") is None:
        pytest.skip("compute-sanitizer not installed")
    script = tmp_path / "case.py"
    script.write_text(
        "import torch, fastsplit\n"
        "x = torch.randn(5, 123, device='cuda', dtype=torch.bfloat16)\n"
        "W = torch.randn(77, 123, device='cuda', dtype=torch.bfloat16)\n"
        "A, B = torch.randn(3, 123, device='cuda', dtype=torch.bfloat16), torch.randn(77, 3, device='cuda', dtype=torch.bfloat16)\n"
        "y = fastsplit.steered_linear(x, W, lora_a=A, lora_b=B, m1=torch.randn(5, device='cuda'), backend='native')\n"
        "h = torch.randn(2, 7, 123, device='cuda', requires_grad=True)\n"
        "l = torch.randint(0, 4099, (2, 7), device='cuda')\n"
        "fastsplit.split_loss(h, h, torch.randn(4099, 123, device='cuda'), l, l, backend='native').backward()\n"
        "torch.cuda.synchronize()\n")
    r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, str(script)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
