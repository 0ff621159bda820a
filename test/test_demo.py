"""The demo: its report arithmetic, and a short run over real ROS 2 (README's first command)."""
import math

import pytest

from xray_ct_reg.demo import _hz, message_rate_hz, settled_stamps


def test_rate_counts_intervals_between_first_and_last_arrival():
    # 4 messages over 0.3 s, given out of order: 3 intervals -> 10 Hz
    assert message_rate_hz([300_000_000, 0, 100_000_000, 200_000_000]) == 10.0


def test_rate_of_fewer_than_two_messages_is_nan():
    assert math.isnan(message_rate_hz([]))
    assert math.isnan(message_rate_hz([5]))
    assert math.isnan(message_rate_hz([5, 5]))


def test_a_frame_older_than_a_judged_one_is_settled_as_dropped():
    # the node judged 10 and 40: 20 and 30 were dropped from its one-frame mailbox, 50 may
    # still be registered
    assert settled_stamps({10, 20, 30, 40, 50}, {10, 40}) == {10, 20, 30, 40}
    assert settled_stamps({10, 20}, set()) == set()
    # a judged stamp counts whether or not it was published (a TF of an earlier run)
    assert settled_stamps({10, 20}, {20, 99}) == {10, 20}


def test_summary_shows_a_missing_rate_as_a_dash_not_nan():
    assert _hz(message_rate_hz([5])) == '-'
    assert _hz(4.26) == '4.3 Hz'


@pytest.mark.parametrize('transport', ['raw', 'compressed'])
def test_a_tracked_sequence_demo_runs_and_shuts_down_cleanly(tmp_path, capsys, transport):
    """README's demo over real ROS 2, short: TF for the frames, and no orphaned callback.

    A callback the executor still ran when the nodes were destroyed made rclpy print 'The
    following exception was never retrieved' after every sequence demo. With ``transport``
    compressed the frames travel as PNG on image_raw/compressed.
    """
    import argparse
    import gc
    import json

    from xray_ct_reg.demo import add_demo_arguments, run_demo
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(['--frames', '5', '--rate', '5', '--motion', 'rotation',
                              '--size', '128', '--out', str(tmp_path),
                              '--image-transport', transport])
    assert run_demo(args) == 0
    gc.collect()
    assert 'never retrieved' not in capsys.readouterr().err
    summary = json.loads((tmp_path / 'summary.json').read_text())['summary']
    assert summary['frames'] == 5 and summary['accepted'] >= 1
    assert summary['timed_out'] is False  # dropped frames do not keep the demo waiting
    assert summary['mtre_mm']['gross_failure_rate'] == 0.0
    assert len(list(tmp_path.glob('overlay_*.png'))) == 5
