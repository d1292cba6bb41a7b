"""The launcher read from the environment (megaclone.launch): torchrun, srun (one task per rank, or
srun torchrun), mpirun, or none, with SLURM's rendezvous computed alike by every task of a step."""

import pytest

from megaclone import launch

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}
CLEARED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
           "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", *SRUN, "SLURM_NTASKS")


@pytest.fixture
def env(monkeypatch):
    for var in CLEARED:
        monkeypatch.delenv(var, raising=False)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    return set_env


@pytest.mark.parametrize("nodelist,host", [("gpu[07-09,12],cpu3", "gpu07"), ("node1,node2", "node1"),
                                           ("localhost", "localhost"), ("rack[2-3]-n[001-004]", "rack2-n001"),
                                           ("a[10,3-5]", "a10")])
def test_first_host_of_a_hostlist(nodelist, host):
    assert launch.first_host(nodelist) == host


def test_an_srun_task_is_a_rank_of_the_step(env):
    env(**SRUN)
    assert (launch.name(), launch.rank(), launch.world_size(), launch.local_rank()) == ("srun", 5, 8, 1)
    port = 20000 + (4242 * 97 + 1) % 20000
    assert launch.slurm_rendezvous() == f"tcp://gpu07:{port}"
    env(SLURM_STEP_ID="2")
    assert launch.slurm_rendezvous() != f"tcp://gpu07:{port}", "each step of a job meets on its own port"
    env(MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    assert launch.slurm_rendezvous() == "tcp://10.0.0.1:1234"


def test_a_batch_script_outside_srun_is_a_world_of_one(env):
    env(SLURM_JOB_ID="4242", SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_JOB_NODELIST="gpu[07-08]")
    assert (launch.name(), launch.rank(), launch.world_size()) == ("single", 0, 1)


def test_torchrun_under_srun_is_torchrun(env):
    env(**SRUN, RANK="3", WORLD_SIZE="4", LOCAL_RANK="3")
    assert (launch.name(), launch.rank(), launch.world_size(), launch.local_rank()) == ("torchrun", 3, 4, 3)


def test_mpirun(env):
    env(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0")
    assert (launch.name(), launch.rank(), launch.world_size(), launch.local_rank()) == ("mpirun", 2, 4, 0)
