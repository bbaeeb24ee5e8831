import pytest

from pyagent.errors import RequestError
from pyagent.types import Completion, CompletionRequest, Message, SamplingParams, Timings, Usage


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", 2.5),
    ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.2), ("top_k", -1),
    ("top_k", True), ("seed", "7"), ("stop", ("",)), ("stop", tuple("abcdefghijklmnopq")),
])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert field in str(info.value)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_request_needs_exactly_one_of_prompt_and_messages():
    with pytest.raises(RequestError, match="exactly one"):
        CompletionRequest()
    with pytest.raises(RequestError, match="exactly one"):
        CompletionRequest(prompt="a", messages=(Message("user", "b"),))
    with pytest.raises(RequestError, match="must not be empty"):
        CompletionRequest(messages=())
    with pytest.raises(RequestError, match="role"):
        CompletionRequest(messages=({"role": "robot", "content": "x"},))


def test_messages_given_as_dicts_become_messages():
    request = CompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert request.messages == (Message("user", "hi"),)
    assert request.is_chat


def test_decode_speed_excludes_the_first_token():
    timings = Timings(time_to_first_token_s=1.0, total_s=3.0, completion_tokens=5)
    assert timings.tokens_per_s == pytest.approx(2.0)
    assert Timings(0.5, 0.5, 1).tokens_per_s == 0.0


def test_completion_round_trips_through_a_dict():
    completion = Completion("hi", "stop", Usage(3, 1, 2), Timings(0.1, 0.2, 1), "m", "embedded")
    assert Completion.from_dict(completion.to_dict()) == completion
    assert completion.usage.total_tokens == 4
