"""SamplingParams' checks are one table (backend/core/sampling.py SAMPLING_CHECKS): every field is checked once, and
a bad value's error names its field in `param`, read from the table, never parsed out of the message."""

import dataclasses

import pytest

from backend.core.errors import RequestError
from backend.core.sampling import SAMPLING_CHECKS, SamplingParams

NORMALIZED = {"stop", "stop_token_ids"}  # turned into tuples by their own checks, before the table runs
BAD = {
    "max_new_tokens": 0,
    "temperature": -0.5,
    "top_k": -1,
    "top_p": 0.0,
    "min_p": 1.0,
    "repetition_penalty": 0.0,
    "presence_penalty": 2.5,
    "frequency_penalty": -3,
    "seed": 2**63,
    "ignore_eos": 1,
    "skip_special_tokens": "yes",
    "logprobs": 21,
    "prompt_logprobs": -1,
}


def test_every_field_is_checked_once_in_the_table():
    names = [c.param for c in SAMPLING_CHECKS]
    assert len(names) == len(set(names))
    assert set(names) | NORMALIZED == {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(BAD) == set(names)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_names_its_field(name):
    with pytest.raises(RequestError) as e:
        SamplingParams(**{name: BAD[name]})
    assert e.value.param == name
    assert str(e.value).startswith(f"{name} must be ") and repr(BAD[name]) in str(e.value)


def test_messages_that_start_with_another_word_still_name_the_field():
    """The table carries the name; a message whose first word is not the field (as "the ...") cannot mislead it."""
    for check in SAMPLING_CHECKS:
        renamed = dataclasses.replace(check, allowed="the right thing")
        with pytest.raises(RequestError) as e:
            renamed.apply(BAD[check.param])
        assert e.value.param == check.param
