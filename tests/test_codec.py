"""Frames: what the decoder accepts, and which records came of which input."""

from __future__ import annotations

import pytest

from orchestrator.codec import Codec, inputs, results


@pytest.fixture(params=["msgpack", "json"])
def codec(request: pytest.FixtureRequest) -> Codec:
    return Codec(request.param)


def test_a_source_frame_and_a_worker_frame_round_trip(codec: Codec) -> None:
    source = [3, 7, 100, "producer.0", None, [{"num": 1}, {"num": 2}]]
    assert codec.decode_frame(codec.encode(source)) == tuple(source)
    worker = [3, 7, 100, "consumer.1", [0, 2, 1], ["a", "b", "c"]]
    assert codec.decode_frame(codec.encode(worker)) == tuple(worker)
    assert inputs(None, ["x", "y"]) == 2
    assert inputs([0, 2, 1], ["a", "b", "c"]) == 3


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ([1, 2, 3, "w.0", [0, -1], []], "at `$[4][1]`"),
        ([1, 2, 3, "w.0", [2], ["only one"]], "add up to 2, but it has 1 items"),
        ([1, 2, 3, "w.0", True, []], "at `$[4]`"),
        ([1, 2, 3], "length 6"),
        ("not a list", "Expected `array`"),
        (["1", 2, 3, "w.0", None, []], "at `$[0]`"),
    ],
)
def test_a_malformed_frame_is_a_value_error_saying_what_is_wrong(
    codec: Codec, frame: object, says: str
) -> None:
    with pytest.raises(ValueError, match="not a frame") as caught:
        codec.decode_frame(codec.encode(frame))
    assert says in str(caught.value)


def test_undecodable_bytes_are_a_value_error(codec: Codec) -> None:
    with pytest.raises(ValueError, match="undecodable frame"):
        codec.decode_frame(b"\xc1{")


def test_the_results_of_some_inputs_are_the_items_that_came_of_them() -> None:
    counts, items = [1, 0, 2, 1], ["a", "b1", "b2", "c"]
    assert results(counts, items, 0, 4) == items
    assert results(counts, items, 0, 1) == ["a"]
    assert results(counts, items, 1, 2) == []
    assert results(counts, items, 1, 3) == ["b1", "b2"]
    assert results(counts, items, 2, 4) == ["b1", "b2", "c"]
    assert results(counts, items, 3, 4) == ["c"]
    # A source's frame: each item is its own input.
    assert results(None, items, 1, 3) == ["b1", "b2"]
    assert results(None, items, 0, 4) == items
