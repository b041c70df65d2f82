from setuptools import find_packages, setup

setup(
    name="hyperkern",
    version="0.1.0",
    description="Fused Triton kernels and a fast PyTorch backend for HyperNetworks (HyperLSTM, static hypernetworks)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in the top-level kernels/ folder and install as hyperkern.kernels.
    packages=find_packages(include=["hyperkern", "hyperkern.*"]) + ["hyperkern.kernels"],
    package_dir={"hyperkern.kernels": "kernels"},
    # the torch backend's C++ time loop: compiled at first use (never at install), so the source ships
    package_data={"hyperkern.ops.hyper_lstm.cpu": ["*.cpp"]},
    # torch: the oldest release the test suite has run on (see README, "Install"); a GPU user's
    # CUDA build at or above it is kept. ninja: the torch backend's C++ CPU loop is built with it at
    # first use (hyperkern finds this pip-installed one even when the venv is not activated).
    install_requires=["torch>=2.11", "numpy", "ninja"],
    extras_require={
        # torch's CUDA wheels already bring a matching Triton; the test extra installs it so the
        # kernels can run under TRITON_INTERPRET=1 on a CPU-only machine.
        "test": [
            "pytest",
            "pytest-benchmark",
            # make test runs the files on 2 workers (one file per worker at a time): 12 min instead of 20
            "pytest-xdist",
            # 3.6: the lent GPU machine's image (torch 2.11); 3.7: torch 2.13's CUDA pin; CI takes the newest
            "triton>=3.6,<3.10; platform_system == 'Linux' and platform_machine == 'x86_64'",
            # so the examples' smoke tests and the report plot run in CI too
            "scikit-learn",
            "matplotlib",
        ],
        "plot": ["matplotlib"],
        # examples/static_digits.py trains on scikit-learn's bundled 8x8 digits (offline)
        "examples": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["hyperkern=hyperkern.__main__:main"]},
)
