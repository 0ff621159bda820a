"""The node's ROS-free stream core: mailbox, CameraInfo pairing, stamp rules, statistics."""
import threading

import pytest

from xray_ct_reg import stream
from xray_ct_reg.stream import NodeConfig, PairingError, StreamCore

KEY = ('carm', 'ct')
SECOND = 1_000_000_000


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def make_core(clock, **config):
    return StreamCore(NodeConfig(**config), clock=clock)


def test_mailbox_keeps_the_latest_frame_and_counts_drops(clock):
    core = make_core(clock)
    for stamp in (1, 2, 3):
        frame, refusal = core.offer_image(f'image {stamp}', stamp * SECOND, KEY)
        assert refusal == ''
    taken = core.take()
    assert taken.payload == 'image 3' and taken.stamp_ns == 3 * SECOND
    stats = core.stats()
    assert stats['frames_received'] == 3 and stats['frames_dropped'] == 2
    assert stats['busy'] is True
    core.finish(taken, 'accepted', stamp_to_tf_ms=12.0)
    stats = core.stats()
    assert stats['busy'] is False and stats['accepted'] == 1
    assert stats['stamp_to_tf_p50_ms'] == 12.0


def test_take_returns_none_after_stop():
    core = StreamCore()
    result = []
    worker = threading.Thread(target=lambda: result.append(core.take()))
    worker.start()
    core.stop()
    worker.join(timeout=5.0)
    assert not worker.is_alive() and result == [None]


def test_camera_info_before_or_after_the_image_pairs_by_stamp(clock):
    core = make_core(clock)
    core.offer_camera_info('info 1', 1 * SECOND)           # CameraInfo first
    core.offer_image('image 1', 1 * SECOND, KEY)
    frame = core.take()
    assert core.camera_info_for(frame) == 'info 1'
    core.finish(frame, 'accepted')
    core.offer_image('image 2', 2 * SECOND, KEY)             # image first, info while pending
    core.offer_camera_info('info 2', 2 * SECOND)
    core.offer_camera_info('info 3', 3 * SECOND)
    frame = core.take()
    assert core.camera_info_for(frame) == 'info 2'
    assert core.stats()['camera_info_paired'] == 2


def test_camera_info_arriving_while_the_worker_waits(clock):
    core = make_core(clock, camera_info_timeout_s=5.0)
    core.offer_image('image', 7 * SECOND, KEY)
    frame = core.take()
    result = []
    waiter = threading.Thread(target=lambda: result.append(core.camera_info_for(frame)))
    waiter.start()
    core.offer_camera_info('other', 8 * SECOND)
    core.offer_camera_info('mine', 7 * SECOND)
    waiter.join(timeout=5.0)
    assert result == ['mine']


def test_a_frame_that_waited_in_the_mailbox_keeps_its_camera_info(clock):
    """The info is attached on arrival, so a long registration cannot evict it from the cache."""
    core = make_core(clock)
    core.offer_camera_info('info 1', 1 * SECOND)
    core.offer_image('image 1', 1 * SECOND, KEY)
    for stamp in range(10, 200):                  # a 30 Hz CameraInfo stream during a refinement
        core.offer_camera_info(f'info {stamp}', stamp * SECOND)
    clock.now += 10.0
    frame = core.take()
    assert core.camera_info_for(frame) == 'info 1'


def test_missing_camera_info_fails_or_falls_back_only_when_configured(clock):
    core = make_core(clock, camera_info_timeout_s=0.0)
    core.offer_camera_info('old info', 1 * SECOND)
    core.offer_image('image', 2 * SECOND, KEY)
    frame = core.take()
    with pytest.raises(PairingError, match='no CameraInfo'):
        core.camera_info_for(frame)
    core.finish(frame, 'error', 'bad input')
    assert core.stats()['camera_info_missing'] == 1
    core.config = NodeConfig(camera_info_timeout_s=0.0, use_latest_camera_info=True)
    core.offer_image('image', 3 * SECOND, KEY)
    frame = core.take()
    assert core.camera_info_for(frame) == 'old info'
    assert core.stats()['camera_info_fallback'] == 1


def test_a_newer_frame_supersedes_one_waiting_for_its_camera_info(clock):
    core = make_core(clock, camera_info_timeout_s=5.0)
    core.offer_image('image 1', 1 * SECOND, KEY)
    frame = core.take()
    core.offer_image('image 2', 2 * SECOND, KEY)
    assert core.camera_info_for(frame) is None
    assert core.stats()['frames_dropped'] == 1 and core.stats()['busy'] is False


@pytest.mark.parametrize('stamp, fragment', [(0, 'zero'), (5 * SECOND, 'repeats'),
                                             (4 * SECOND, 'older than')])
def test_stamps_tf2_would_drop_are_refused(clock, stamp, fragment):
    core = make_core(clock)
    core.offer_image('published', 5 * SECOND, KEY)
    published = core.take()
    assert core.claim_stamp(published) == ''
    core.finish(published, 'accepted')
    frame, refusal = core.offer_image('again', stamp, KEY)
    assert fragment in refusal
    core.finish(frame, 'error', refusal)
    stats = core.stats()
    assert stats['stamp_refused'] == 1 and stats['errors'] == 1
    assert stats['busy'] is False, 'a refused frame must not mark the worker busy'
    # another frame pair (e.g. a second C-arm) has its own history
    assert core.offer_image('other imager', 4 * SECOND, ('carm2', 'ct'))[1] == ''


def test_a_jump_back_beyond_the_tf_cache_or_an_activation_starts_the_stamp_order_anew(clock):
    """A replay looping or a clock reset must not stop publishing for good."""
    core = make_core(clock)
    core.offer_image('published', 30 * SECOND, KEY)
    assert core.claim_stamp(core.take()) == ''
    within = 30 * SECOND - stream.TF_CACHE_NS + 1
    assert 'older than' in core.offer_image('back a little', within, KEY)[1]
    frame, refusal = core.offer_image('looped', 30 * SECOND - stream.TF_CACHE_NS - 1, KEY)
    assert refusal == ''
    assert core.claim_stamp(core.take()) == '' and core.stats()['stamp_restarts'] == 1
    assert core.offer_image('in order again', 21 * SECOND, KEY)[1] == ''
    core.reset()
    assert core.offer_image('after activation', 5 * SECOND, KEY)[1] == ''


def test_nothing_is_claimed_for_publishing_after_stop(clock):
    core = make_core(clock)
    core.offer_image('registering', 3 * SECOND, KEY)
    frame = core.take()
    core.stop()
    assert 'stopped' in core.claim_stamp(frame)


def test_claim_stamp_refuses_a_stamp_published_while_registering(clock):
    """Two frames in flight with the same stamp: only the first may publish."""
    core = make_core(clock)
    core.offer_image('first', 9 * SECOND, KEY)
    first = core.take()
    core.offer_image('second', 9 * SECOND, KEY)
    second = core.take()
    assert core.claim_stamp(first) == ''
    assert 'repeats' in core.claim_stamp(second)


def test_no_frame_warning_only_when_idle_with_publishers_and_nothing_ever_arrived(clock):
    core = make_core(clock, no_frame_warning_s=3.0)
    clock.now += 10.0
    assert core.warning(publishers=0) == ''
    warning = core.warning(publishers=1)
    assert 'no frame arrived' in warning and 'QoS' in warning
    core.offer_image('single shot', 1 * SECOND, KEY)
    frame = core.take()
    clock.now += 20.0                     # a long refinement: busy, not silent
    assert core.warning(publishers=1) == ''
    core.finish(frame, 'rejected', 'gates')
    clock.now += 60.0                     # single shots minutes apart are normal
    assert core.warning(publishers=1) == ''


def test_latency_percentiles(clock):
    core = make_core(clock)
    for index in range(1, 101):
        core.offer_image(index, index * SECOND, KEY)
        frame = core.take()
        clock.now += index / 1000.0
        core.finish(frame, 'accepted', stamp_to_tf_ms=float(index))
    stats = core.stats()
    assert stats['arrival_to_verdict_p50_ms'] == pytest.approx(50.5, abs=0.1)
    assert stats['arrival_to_verdict_p95_ms'] == pytest.approx(95.05, abs=0.1)
    assert stats['stamp_to_tf_p95_ms'] == pytest.approx(95.05, abs=0.1)
    assert stats['processed_rate_hz'] > 0


def test_rates_count_every_event_of_the_window(clock):
    core = make_core(clock)
    for index in range(300):                     # 30 Hz for 10 s
        clock.now += 1.0 / 30.0
        core.offer_image(index, (index + 1) * SECOND, KEY)
    assert core.stats()['input_rate_hz'] == pytest.approx(30.0, abs=0.2)
    clock.now += 20.0
    core.offer_image('late', 400 * SECOND, KEY)
    assert core.stats()['input_rate_hz'] == pytest.approx(0.1)


def test_incompatible_publishers_are_warned_about(clock):
    core = make_core(clock, image_qos='reliable')
    assert core.warning(publishers=1) == ''
    core.note_incompatible_publisher('RELIABILITY')
    warning = core.warning(publishers=1)
    assert 'incompatible with image_qos=reliable' in warning and 'RELIABILITY' in warning
    assert core.stats()['incompatible_publishers'] == 1


def test_tracking_prior_is_the_last_accepted_pose_while_fresh(clock):
    core = make_core(clock, tracking_max_age_s=2.0)
    first, _ = core.offer_image('a', 10 * SECOND, KEY)
    assert core.prior_pose(first) is None  # nothing accepted yet
    core.remember_pose(first, 'pose a')
    fresh, _ = core.offer_image('b', 11 * SECOND, KEY)
    assert core.prior_pose(fresh) == 'pose a'
    core.remember_pose(fresh, 'pose b', tracked=True)
    assert core.prior_pose(fresh) is None  # not newer than the pose it would start from
    assert core.stats()['tracked'] == 1
    other, _ = core.offer_image('c', 11 * SECOND + 1, ('other_imager', 'ct'))
    assert core.prior_pose(other) is None  # another frame pair
    stale, _ = core.offer_image('d', 14 * SECOND, KEY)
    assert core.prior_pose(stale) is None  # 3 s after the last accepted one
    core.config = NodeConfig(tracking=False)
    assert core.prior_pose(fresh) is None
    core.config = NodeConfig()
    core.reset()
    assert core.prior_pose(fresh) is None  # a new activation forgets
