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
        "matplotlib>=3.7",  # figures of the Scaling Smart reproduction
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=4.45"],  # tests build tiny HF models with transformers' own classes
        "hf": ["transformers>=4.45"],  # --src-hf verification and config.json on export
    },
)
