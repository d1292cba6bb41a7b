"""Two torchrun agents on one machine act as two nodes (c10d rendezvous, shared filesystem): the
expansion they write together is byte-for-byte the one a single agent writes. One rank a node keeps
the job at two ranks (on two cores a rank more doubles its cost); node 1's rank is global rank 1 and
local rank 0, so a rank that confused the two would write node 0's slice twice."""

import socket
import subprocess
import sys

import pytest
from util import CLI_EXPANSION, ROOT, tensor_digests

pytestmark = pytest.mark.slow  # torchrun jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_write_the_same_bytes_as_one(cli_source, cli_expanded, tmp_path):
    src = cli_source
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "megaclone-test",
             "tools/expand_sharded.py", "--load", str(src), "--save", str(tmp_path / "two"), *CLI_EXPANSION],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for agent in agents:
        out, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-3000:]
    one, two = tensor_digests(cli_expanded), tensor_digests(tmp_path / "two")
    assert len(one) == 9 and one == two
