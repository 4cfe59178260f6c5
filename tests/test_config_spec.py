"""EngineConfig is the one declaration of every option: the validation, the errors' `param`, and the command-line
flags of the server and the benchmarks come from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from backend.core.config import (
    EngineConfig,
    OptionSpec,
    add_engine_flags,
    engine_option_names,
    engine_options_from_args,
)
from backend.core.errors import EngineError, RequestError
from backend.core.sampling import SamplingParams


def test_every_option_is_declared_with_help():
    for f in dataclasses.fields(EngineConfig):
        spec = f.metadata["spec"]
        assert isinstance(spec, OptionSpec) and spec.help, f.name


def test_the_config_is_frozen():
    cfg = EngineConfig(model="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 32
    assert dataclasses.replace(cfg, block_size=32).block_size == 32


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(block_size=12), "block_size"),
        (dict(num_kv_blocks=0), "num_kv_blocks"),
        (dict(dtype="float64"), "dtype"),
        (dict(seed=-1), "seed"),
        (dict(device="tpu"), "device"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_errors_carry_the_option(kwargs, param):
    with pytest.raises(EngineError) as e:
        EngineConfig.from_kwargs("m", **kwargs)
    assert e.value.param == param


def test_request_errors_carry_the_field():
    with pytest.raises(RequestError) as e:
        SamplingParams(top_p=0)
    assert e.value.param == "top_p"


def test_flags_come_from_the_declarations():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_options_from_args(parser.parse_args([])) == {}  # every default stays the engine's
    args = parser.parse_args(["--block-size", "32", "--no-enable-prefix-caching", "--context-length", "64"])
    assert engine_options_from_args(args) == dict(block_size=32, enable_prefix_caching=False, max_model_len=64)
    help_text = parser.format_help()
    for name in engine_option_names():
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"(default: {EngineConfig.default(name)})" in " ".join(help_text.split())


def test_launch_server_passes_only_the_options_given():
    from backend.launch_server import engine_options, parse_args

    assert engine_options(parse_args(["--model-path", "m"])) == {}
    args = parse_args(["--model-path", "m", "--max-num-seqs", "8", "--dtype", "float32"])
    assert engine_options(args) == dict(max_num_seqs=8, dtype="float32")
