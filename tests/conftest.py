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


@pytest.fixture(scope="session")
def cli_expanded(cli_source, tmp_path_factory):
    """cli_source grown by ``torchrun --nproc_per_node 2 tools/expand_sharded.py`` with CLI_EXPANSION,
    once: the bytes the mpirun and two-agent launches must reproduce."""
    from util import CLI_EXPANSION, torchrun

    dst = tmp_path_factory.mktemp("cli-expanded") / "wide-torchrun"
    proc = torchrun(2, "expand_sharded.py", "--load", str(cli_source), "--save", str(dst), *CLI_EXPANSION)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| rank |" in proc.stdout and "peak RSS" in proc.stdout
    return dst


# test module -> the 4-rank worker (tests/<name>_worker.py) whose results it examines
FOUR_RANK_WORKERS = {"test_end_to_end": "e2e", "test_depth": "depth", "test_moe": "moe", "test_pipeline": "pp",
                     "test_hf": "hf"}


@pytest.fixture(scope="session")
def four_rank_results(request, tmp_path_factory):
    """One torchrun of 4 ranks (tests/workers.py) runs the workers of every selected module that
    needs one, instead of one launch (and one round of imports on every rank) per module."""
    import json

    from util import ROOT, run, torchrun_command

    selected = {getattr(item.module, "__name__", "") for item in request.session.items}
    names = [name for module, name in FOUR_RANK_WORKERS.items() if module in selected]
    out = tmp_path_factory.mktemp("workers")
    proc = run(torchrun_command(4, ROOT / "tests" / "workers.py", out, *names), timeout=3600)
    if proc.returncode != 0:
        raise AssertionError(f"tests/workers.py {' '.join(names)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return {name: json.loads((out / name / "results.json").read_text()) for name in names}
