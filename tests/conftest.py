import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches torchrun jobs or trains; deselect with -m 'not slow' "
                                       "for the inner loop")
    # megatron-core and torch DCP warn about missing Transformer Engine and deprecated entry points
    # on every call; none of it is about megaclone.
    for module in (r"megatron\..*", r"torch\..*"):
        config.addinivalue_line("filterwarnings", f"ignore::Warning:{module}")


@pytest.fixture(scope="session")
def cli_source(tmp_path_factory):
    """A Llama-like source at TP 2 built by the tool a user runs (torchrun make_source.py), once for
    every test of the tools; each user checks that it is left unchanged."""
    from util import torchrun

    root = tmp_path_factory.mktemp("cli-source") / "src"
    proc = torchrun(2, "make_source.py", "--preset", "llama", "--save", str(root), "--train-steps", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root
