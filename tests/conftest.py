import os

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so xdist workers don't oversubscribe.
torch.set_num_threads(int(os.environ.get("NORMSOFTMAX_TEST_THREADS", "1")))


@pytest.fixture
def cli(capsys):
    """Run the command line in-process; returns (exit code, stdout, stderr)."""
    from normsoftmax.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
