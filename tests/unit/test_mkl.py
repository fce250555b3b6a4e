"""`import network` picks MKL's AVX2 sgemm on AMD CPUs of the CPU build, never overriding the user's value."""
import subprocess
import sys

from network import mkl


def test_sets_avx2_on_amd_only_when_unset(monkeypatch):
    monkeypatch.setattr(mkl, "_amd_cpu", lambda: True)
    monkeypatch.setattr(mkl, "_paddle_cpu_wheel", lambda: True)
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    assert mkl.prefer_mkl_avx2()
    assert mkl.os.environ["MKL_DEBUG_CPU_TYPE"] == "5"
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "3")
    assert not mkl.prefer_mkl_avx2()
    assert mkl.os.environ["MKL_DEBUG_CPU_TYPE"] == "3"
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE")
    monkeypatch.setattr(mkl, "_amd_cpu", lambda: False)
    assert not mkl.prefer_mkl_avx2()
    assert "MKL_DEBUG_CPU_TYPE" not in mkl.os.environ


def test_import_network_applies_it_before_any_matmul():
    """A fresh interpreter: the variable is set by the import itself (on this machine's CPU vendor)."""
    code = ("import os; os.environ.pop('MKL_DEBUG_CPU_TYPE', None); import network; from network import mkl; "
            "print(os.environ.get('MKL_DEBUG_CPU_TYPE'), mkl._amd_cpu())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    value, amd = out.stdout.split()
    assert value == ("5" if amd == "True" else "None")


def test_gpu_wheel_is_left_alone_and_paddle_is_not_imported(monkeypatch):
    """A GPU wheel (distribution `paddlepaddle-gpu`) keeps MKL's own choice; deciding never imports paddle."""
    monkeypatch.setattr(mkl, "_amd_cpu", lambda: True)
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    monkeypatch.setattr(mkl.importlib.metadata, "version", lambda name: (_ for _ in ()).throw(
        mkl.importlib.metadata.PackageNotFoundError(name)))
    assert not mkl.prefer_mkl_avx2()
    assert "MKL_DEBUG_CPU_TYPE" not in mkl.os.environ
    code = "import sys, os; os.environ.pop('MKL_DEBUG_CPU_TYPE', None); import network; print('paddle' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
