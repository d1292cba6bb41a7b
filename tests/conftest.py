import os
import sys

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
