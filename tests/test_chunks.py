"""The rows per [rows, V] block of the scoring pass and the loss: a number, or `auto` chosen from device and V."""

import pytest
import torch

from tip_cli.cli import compose_config
from tip_cli.config.schema import ConfigError
from tip_cli.train.chunks import CPU_ROWS, auto_rows, chunk_rows

GiB = 2**30


def test_cpu_keeps_256_rows_whatever_the_vocabulary():
    for vocab in (512, 151_936, 262_144):
        assert auto_rows(vocab, "cpu") == 256
    assert chunk_rows("auto", 151_936, torch.device("cpu")) == chunk_rows(None, 151_936, torch.device("cpu")) == 256


@pytest.mark.parametrize("vocab", [32_000, 151_936, 262_144])
def test_cuda_rows_are_the_most_multiples_of_64_whose_fp32_block_fits_1_gib(vocab):
    rows = auto_rows(vocab, "cuda", 141 * GiB)
    block = 4 * vocab  # bytes of one fp32 row
    assert rows % 64 == 0 and rows * block <= GiB < (rows + 64) * block


def test_a_small_gpu_gets_a_64th_of_its_memory_and_never_fewer_rows_than_the_cpu():
    rows = auto_rows(151_936, "cuda", 24 * GiB)
    assert rows % 64 == 0 and rows * 4 * 151_936 <= 24 * GiB / 64 < (rows + 64) * 4 * 151_936
    assert auto_rows(151_936, "cuda", 2 * GiB) == CPU_ROWS  # 32 MiB would be 55 rows: the floor wins


def test_a_number_is_used_as_given():
    assert chunk_rows(100, 151_936, torch.device("cpu")) == 100


def test_config_takes_auto_null_or_a_positive_number_and_names_them_otherwise():
    assert compose_config([]).loss.chunk_size == "auto"
    assert compose_config(["loss.chunk_size=null", "importance.chunk_size=512"]).importance.chunk_size == 512
    for bad in ("loss.chunk_size=0", "loss.chunk_size=atuo", "importance.chunk_size=-3", "loss.chunk_size=1.5"):
        with pytest.raises(ConfigError, match="auto"):
            compose_config([bad])
