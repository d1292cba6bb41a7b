from setuptools import find_packages, setup

setup(
    name="megaclone",
    version="0.1.0",
    description="HyperCloning of Megatron tensor-parallel GPT checkpoints, rank by rank",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megaclone", "megaclone.*"]),
    python_requires=">=3.10",
    entry_points={"console_scripts": ["megaclone = megaclone.commands:main"]},
    install_requires=[
        # What works, not what this machine has: a Megatron environment's own torch and megatron-core
        # satisfy these, so pip leaves them alone. torch 2.6 made weights-only loading the default and
        # has add_safe_globals (megaclone.formats.unpickling); megatron-core 0.14 is the oldest run here (README,
        # "Versions"). A CPU machine keeps the CPU wheel through the README's install line, not a bound here.
        "torch>=2.6",
        "megatron-core>=0.14",
        "numpy>=1.24",
        "safetensors>=0.4",
        "psutil>=5.9",  # dist_checkpointing.save needs it; also peak-memory sampling
        "mpi4py>=4.0",
        "mpich>=4.2",  # an MPI runtime with mpirun/mpiexec, as a wheel: no system install needed
        "tqdm>=4.60",  # rank-0 progress bar
    ],
    extras_require={
        # tests build tiny HF models with transformers' own classes and run the reproduction's quick mode
        # transformers 5.23 (the whole suite) and 5.25 (the HF tests) run here: its MoE configs, its
        # per-expert save format; no upper bound, as for torch and megatron-core
        "test": ["pytest>=8", "packaging>=23", "transformers>=5.23", "matplotlib>=3.7"],
        "hf": ["transformers>=5.23"],  # --src-hf verification, config.json on export, the HF families
        "repro": ["matplotlib>=3.7"],  # figures of the Scaling Smart reproduction
    },
)
