import struct

from hypothesis import given, settings, strategies as st

from gwms.protocols.framing import FrameDecoder, FrameError, encode_frame


def test_round_trip_of_several_frames_fed_byte_by_byte():
    data = encode_frame("Q", 1, "UPDATE", b"[a = 1]") + encode_frame("R", 2, "QUERY", b"[]")
    decoder = FrameDecoder(1024)
    frames = []
    for i in range(len(data)):
        got, error = decoder.feed(data[i:i + 1])
        assert error is None
        frames.extend(got)
    assert [(f.kind, f.request_id, f.command, f.body) for f in frames] == [
        ("Q", 1, "UPDATE", b"[a = 1]"), ("R", 2, "QUERY", b"[]")]
    assert decoder.pending == 0


def test_oversized_length_is_refused_before_buffering():
    decoder = FrameDecoder(100)
    frames, error = decoder.feed(struct.pack("!I", 101) + b"Q 1 X\n")
    assert frames == []
    assert error.code == "FRAME_TOO_LARGE"
    assert "101 bytes exceeds the maximum of 100" in error.message
    assert decoder.pending == 0


def test_good_frames_before_a_bad_one_are_kept():
    good = encode_frame("Q", 7, "QUERY", b"[]")
    bad = struct.pack("!I", 8) + b"Z 1 X\n[]"
    frames, error = FrameDecoder(1024).feed(good + bad)
    assert [f.request_id for f in frames] == [7]
    assert error.code == "MALFORMED_FRAME" and "unknown frame kind" in error.message


def test_malformed_headers_each_get_a_named_error():
    cases = {
        b"Q 1\n[]": "is not '<kind> <id> <command>'",
        b"Q x UPDATE\n[]": "bad request id",
        b"Q 1 update\n[]": "bad command name",
        b"Q 1 UPDATE" + b"x" * 200: "missing its end of line",
        b"Q 99999999999999999999 UPDATE\n": "bad request id",
    }
    for payload, message in cases.items():
        frames, error = FrameDecoder(1024).feed(struct.pack("!I", len(payload)) + payload)
        assert frames == [] and error is not None, payload
        assert message in error.message, (payload, error.message)


def test_too_short_frame_and_input_after_error():
    decoder = FrameDecoder(1024)
    _, error = decoder.feed(struct.pack("!I", 2) + b"ab")
    assert "too short" in error.message
    frames, error = decoder.feed(encode_frame("Q", 1, "QUERY", b"[]"))
    assert frames == [] and error.message == "input after a protocol error"


@settings(max_examples=300)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_random_bytes_never_crash_the_decoder(data, chunk):
    decoder = FrameDecoder(512)
    for i in range(0, len(data), chunk):
        frames, error = decoder.feed(data[i:i + chunk])
        for f in frames:
            assert f.kind in "QRIE" and len(f.body) <= 512
        if error is not None:
            assert isinstance(error, FrameError) and error.code in ("MALFORMED_FRAME", "FRAME_TOO_LARGE")
            break
    assert decoder.pending <= 512 + 4
