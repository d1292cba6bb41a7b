from setuptools import find_packages, setup

setup(
    name="megaclone",
    version="0.1.0",
    description="HyperCloning of Megatron tensor-parallel GPT checkpoints, rank by rank",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megaclone", "megaclone.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Tested: torch 2.13.0 (CPU wheel), megatron-core 0.16.1. The upper bound on torch keeps pip
        # on a CPU machine from pulling a multi-GB CUDA build of a newer release.
        "torch>=2.6,<2.14",
        "megatron-core>=0.16.1,<0.17",
        "numpy>=1.24",
        "safetensors>=0.4",
        "psutil>=5.9",  # dist_checkpointing.save needs it; also peak-memory sampling
        "mpi4py>=4.0",
        "mpich>=4.2",  # an MPI runtime with mpirun/mpiexec, as a wheel: no system install needed
        "tqdm>=4.60",  # rank-0 progress bar
    ],
    extras_require={
        # tests build tiny HF models with transformers' own classes and run the reproduction's quick mode
        "test": ["pytest>=8", "transformers>=5.23,<5.24", "matplotlib>=3.7"],
        "hf": ["transformers>=5.23,<5.24"],  # tested version; --src-hf verification, config.json on export
        "repro": ["matplotlib>=3.7"],  # figures of the Scaling Smart reproduction
    },
)
