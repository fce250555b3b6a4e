"""bench_train_step with MKL_DEBUG_CPU_TYPE=5 (a one-line environment fix, measured here before we adopt it).

Paddle 3.3.1's CPU wheel bundles MKLML 2019, whose sgemm picks a slow generic code path on AMD CPUs;
MKL_DEBUG_CPU_TYPE=5 makes it use the AVX2 kernels (honoured by MKL <= 2020.0, read at the first MKL call).
torch's MKL 2024 ignores the variable, so the HF side runs as in bench_train_step.
"""
import os

BENCH_TIMEOUT = 420  # read by run_all (the import below does not carry it)

os.environ["MKL_DEBUG_CPU_TYPE"] = "5"

import bench_train_step  # noqa: E402

if __name__ == "__main__":
    bench_train_step.main(variant=", MKL_DEBUG_CPU_TYPE=5")
