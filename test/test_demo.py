"""The demo's report arithmetic (the demo itself runs real ROS 2: README's first command)."""
import math

from xray_ct_reg.demo import _hz, message_rate_hz


def test_rate_counts_intervals_between_first_and_last_arrival():
    # 4 messages over 0.3 s, given out of order: 3 intervals -> 10 Hz
    assert message_rate_hz([300_000_000, 0, 100_000_000, 200_000_000]) == 10.0


def test_rate_of_fewer_than_two_messages_is_nan():
    assert math.isnan(message_rate_hz([]))
    assert math.isnan(message_rate_hz([5]))
    assert math.isnan(message_rate_hz([5, 5]))


def test_summary_shows_a_missing_rate_as_a_dash_not_nan():
    assert _hz(message_rate_hz([5])) == '-'
    assert _hz(4.26) == '4.3 Hz'
