from setuptools import find_packages, setup

PACKAGES = ["network", "placements", "autoparallel", "launch", "ckpt_tools"]

setup(
    name="qwen2vl-ap",
    version="0.1.0",
    description="Qwen2-VL fine-tuning with PaddlePaddle semi-automatic parallelism",
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    package_data={"launch": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["qwen2vl-ap=launch.cli:main"]},
)
