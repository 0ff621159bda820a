"""The node's frame stream without ROS: mailbox, CameraInfo pairing, stamp rules, statistics.

``node.RegistrationNode`` is a thin adapter: its callbacks hand messages to a
:class:`StreamCore`, its worker thread takes frames from it, and its diagnostics print
:meth:`StreamCore.stats`. Everything that decides what happens to a frame lives here and is
tested without DDS:

* **Mailbox** - one slot: registration works on the latest frame; a frame replaced before the
  worker took it is counted as dropped.
* **CameraInfo pairing** - CameraInfo is cached by stamp (either order of arrival works); a
  frame that arrives first waits up to ``camera_info_timeout_s`` after its arrival for its own.
  Only when ``use_latest_camera_info`` is set does a frame fall back to the newest CameraInfo.
  Pairings, fallbacks and failures are counted.
* **Stamp rules** - tf2 drops a transform stamped zero or repeating a stamp it holds
  (TF_REPEATED_DATA), and one more than its cache (``TF_CACHE_NS``, 10 s) older than the newest
  (TF_OLD_DATA). The transforms of a frame pair go out in stamp order: a frame stamped zero, or
  not newer than the last published transform of its frame pair, is refused on arrival and
  again just before publishing (:meth:`StreamCore.claim_stamp`). A stamp more than the cache
  behind the last (a replay looping, a C-arm clock reset) starts the order anew and is counted
  (``stamp_restarts``); each activation starts it anew too.
* **Statistics** - counters, rates, arrival-to-verdict and stamp-to-TF latency percentiles, and
  the input warnings: a publisher whose QoS is incompatible, and "no frames", raised only when a
  publisher exists, the node is idle and nothing at all has arrived since activation for
  ``no_frame_warning_s`` (a C-arm taking single shots is silent between them; not a fault).
"""
import collections
from dataclasses import dataclass
import threading
import time

import numpy as np

from xray_ct_reg import geometry, image_io
from xray_ct_reg.settings import setting

CAMERA_INFO_CACHE = 64        # CameraInfo messages kept for pairing by stamp
STATS_WINDOW = 200            # frames kept for latency percentiles
RATE_WINDOW_S = 10.0          # seconds over which rates are computed
TF_CACHE_NS = 10 * 10**9      # tf2's default cache: older than the newest by more is dropped
QOS_PROFILES = ('sensor_data', 'reliable')
# image_transport transports the node subscribes with (``ros_io.IMAGE_TRANSPORTS``)
IMAGE_TRANSPORTS = ('raw', 'compressed')


@dataclass
class NodeConfig:
    """Node: topics, frames, CameraInfo pairing and outputs.

    Declared once with ``settings.setting``; the node's parameters and the YAML comments come
    from here.
    """

    autostart: bool = setting(
        True, 'configure and activate the lifecycle node at start (false: wait for lifecycle '
        'requests)')
    model_path: str = setting(
        '', "checkpoint (.pt) of the patient's scene coordinate network; '': the committed "
        'example model of the installed package')
    ct_path: str = setting(
        '', "CT the model was trained for, checked against the checkpoint (another CT: configure "
        "fails); needed for intensity refinement and the overlay. '': none (SCR only), "
        "'example': the embedded chest CT")
    ct_frame: str = setting('ct', 'TF frame id of the CT: child frame of the published '
                                  'transform (its parent with publish_inverse)')
    image_topic: str = setting(
        '/carm/image_raw', 'X-ray image base topic (sensor_msgs/Image: '
        f"{', '.join(image_io.IMAGE_ENCODINGS)}; colour as its luminance: "
        f"{', '.join(image_io.COLOUR_ENCODINGS)})")
    image_transport: str = setting(
        'raw', "image_transport's transport of the images: raw (sensor_msgs/Image on "
        'image_topic) or compressed (sensor_msgs/CompressedImage on image_topic/compressed, '
        'PNG or JPEG as the compressed plugin publishes it; PNG keeps 16 bit)',
        choices=IMAGE_TRANSPORTS)
    camera_info_topic: str = setting('/carm/camera_info',
                                     'CameraInfo topic, paired with the images by stamp')
    use_camera_info: bool = setting(
        True, 'take K from the CameraInfo with the image stamp; false: fallback geometry from '
        'sdd_mm and pixel_spacing_mm')
    camera_info_timeout_s: float = setting(
        0.5, 'how long after its arrival a frame waits for the CameraInfo with its stamp (s)',
        limits=(0.0, 10.0), live=True)
    use_latest_camera_info: bool = setting(
        False, 'when no CameraInfo with the image stamp came within camera_info_timeout_s, use '
        'the newest CameraInfo received (counted on /diagnostics); false: skip the frame',
        live=True)
    sdd_mm: float = setting(
        geometry.CIOS_FUSION_SDD_MM, 'source-to-detector distance (mm); turns K (px) into '
        'detector mm', limits=(100.0, 3000.0), live=True)
    pixel_spacing_mm: float = setting(
        geometry.CIOS_FUSION_PIXEL_SPACING_MM, 'fallback geometry only: pixel spacing of the '
        'incoming image (mm/px)', limits=(0.001, 10.0), live=True)
    image_qos: str = setting(
        'sensor_data', 'QoS of the image and CameraInfo subscriptions: sensor_data (best effort, '
        'REP 2003; matches reliable and best-effort publishers) or reliable (matches reliable '
        'publishers only)', choices=QOS_PROFILES)
    publish_overlay: bool = setting(
        True, 'publish ~/overlay (bone outline on the X-ray) when it has subscribers; needs '
        'ct_path', live=True)
    publish_inverse: bool = setting(
        False, 'publish CT -> image frame on TF instead, for trees where the CT frame already '
        'has a parent')
    no_frame_warning_s: float = setting(
        30.0, 'warn on /diagnostics when the image topic has publishers, the node is idle and no '
        'frame at all arrived this long after activation (s)', limits=(0.5, 3600.0), live=True)
    tracking: bool = setting(
        True, 'with intensity refinement: start from the last accepted pose of the same frame '
        'pair while it is fresh (tracking_max_age_s), a short schedule; on rejection the frame '
        'goes the whole way (network, PnP, refinement)', live=True)
    tracking_max_age_s: float = setting(
        2.0, 'how long (s, by image stamps) an accepted pose may start the next frames',
        limits=(0.0, 60.0), live=True)


class PairingError(ValueError):
    """No CameraInfo for a frame (and no fallback allowed)."""


@dataclass
class Frame:
    """An image waiting for (or under) registration."""

    payload: object          # the image message, opaque to the core
    stamp_ns: int            # header stamp (ns)
    tf_key: tuple            # (parent, child) frames of the transform it would publish
    received: float          # arrival time (s, the core's clock)
    camera_info: object = None


def _append_recent(times, now):
    """Append ``now`` to a deque of event times, dropping those older than RATE_WINDOW_S."""
    times.append(now)
    while now - times[0] > RATE_WINDOW_S:
        times.popleft()


def _percentiles(values):
    """p50 and p95 of a sequence (NaN when empty), rounded to 0.1."""
    if not values:
        return float('nan'), float('nan')
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return round(float(p50), 1), round(float(p95), 1)


def tracking_start(last_accepted, stamp_ns, config):
    """The pose a frame stamped ``stamp_ns`` is tracked from, or None.

    ``last_accepted``: (stamp ns, pose) of the last accepted frame of the same frame pair, or
    None. It starts the frame while fresh: ``config.tracking`` on and 0 < age <=
    ``config.tracking_max_age_s`` by the stamps. The node, ``register --frame all`` and the
    offline ``replay`` all track by this rule.
    """
    if not config.tracking or last_accepted is None:
        return None
    accepted_ns, pose = last_accepted
    age_s = (stamp_ns - accepted_ns) * 1e-9
    return pose if 0.0 < age_s <= config.tracking_max_age_s else None


class StreamCore:
    """Mailbox, CameraInfo pairing, stamp rules and statistics of one activation (thread-safe).

    The node's ROS callbacks call :meth:`offer_image` and :meth:`offer_camera_info`; its worker
    loops on :meth:`take`, :meth:`camera_info_for`, then reports with :meth:`finish`.
    ``config`` is a :class:`NodeConfig`; assign a new one to apply live changes.
    """

    def __init__(self, config=None, clock=time.monotonic):
        """An empty stream; ``clock`` gives seconds (monotonic)."""
        self.config = config or NodeConfig()
        self._clock = clock
        self._cond = threading.Condition()
        self.reset()

    def reset(self):
        """Empty the mailbox and caches, zero the counters, start the stamp order (on activate)."""
        with self._cond:
            self._last_published = {}  # tf_key -> stamp (ns) of the last published transform
            self._pending = None
            self._tracks = {}          # tf_key -> (stamp ns, pose) of the last accepted frame
            self._current = None       # the frame the worker is registering
            self._stopped = False
            self._camera_infos = collections.OrderedDict()
            self._latest_camera_info = None
            self._counts = collections.Counter()
            self._arrival_to_verdict_ms = collections.deque(maxlen=STATS_WINDOW)
            self._stamp_to_tf_ms = collections.deque(maxlen=STATS_WINDOW)
            self._arrivals = collections.deque()        # times within RATE_WINDOW_S
            self._verdict_times = collections.deque()
            self._last_verdict, self._last_reason = 'none', ''
            self._incompatible_policy = ''
            self._activated_at = self._clock()

    # ------------------------------------------------------------------------- input
    def stamp_refusal(self, stamp_ns, tf_key):
        """Why a transform with this stamp must not be published ('' when it may)."""
        if stamp_ns <= 0:
            return 'image stamp is zero: tf2 drops such transforms (set header.stamp)'
        last = self._last_published.get(tf_key)
        if last is None or stamp_ns > last or stamp_ns < last - TF_CACHE_NS:
            return ''  # in order, or far enough back to start the order anew
        prefix = f'image stamp {stamp_ns * 1e-9:.6f} s'
        pair = f'{tf_key[0]} -> {tf_key[1]} ({last * 1e-9:.6f} s)'
        if stamp_ns == last:
            return f'{prefix} repeats the last published transform {pair}: tf2 would drop it'
        return (f'{prefix} is older than the last published transform {pair}: a frame pair\'s '
                f'transforms go out in stamp order (a jump back of more than '
                f'{TF_CACHE_NS * 1e-9:g} s starts it anew)')

    def offer_image(self, payload, stamp_ns, tf_key):
        """A frame arrived: put it in the mailbox. Returns (frame, refusal reason or '').

        A refused frame (bad stamp) does not enter the mailbox; report it with :meth:`finish`.
        """
        with self._cond:
            now = self._clock()
            frame = Frame(payload, int(stamp_ns), tuple(tf_key), now,
                          self._camera_infos.get(int(stamp_ns)))
            self._counts['received'] += 1
            _append_recent(self._arrivals, now)
            refusal = self.stamp_refusal(frame.stamp_ns, frame.tf_key)
            if refusal:
                self._counts['stamp_refused'] += 1
                return frame, refusal
            if self._pending is not None:
                self._counts['dropped'] += 1
            self._pending = frame
            self._cond.notify_all()
            return frame, ''

    def offer_camera_info(self, info, stamp_ns):
        """A CameraInfo arrived: cache it by stamp (bounded) and hand it to a waiting frame."""
        with self._cond:
            stamp_ns = int(stamp_ns)
            self._camera_infos[stamp_ns] = info
            self._camera_infos.move_to_end(stamp_ns)
            while len(self._camera_infos) > CAMERA_INFO_CACHE:
                self._camera_infos.popitem(last=False)
            self._latest_camera_info = info
            if self._pending is not None and self._pending.stamp_ns == stamp_ns:
                self._pending.camera_info = info
            self._cond.notify_all()

    # ------------------------------------------------------------------------- worker
    def take(self):
        """Block until a frame is pending and return it (None once :meth:`stop` was called)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None or self._stopped)
            if self._stopped:
                return None
            frame, self._pending = self._pending, None
            self._current = frame
            return frame

    def camera_info_for(self, frame):
        """The frame's CameraInfo, waiting until ``camera_info_timeout_s`` after its arrival.

        Returns None when a newer frame arrived meanwhile or the stream stopped (the frame is
        then counted as dropped). Without a CameraInfo of its stamp in time, returns the newest
        CameraInfo when ``use_latest_camera_info`` is set, else raises :class:`PairingError`.
        """
        config = self.config
        deadline = frame.received + config.camera_info_timeout_s
        with self._cond:
            while True:
                info = frame.camera_info or self._camera_infos.get(frame.stamp_ns)
                if info is not None:
                    self._counts['camera_info_paired'] += 1
                    return info
                if self._stopped or self._pending is not None:
                    self._counts['dropped'] += 1
                    self._current = None
                    return None
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if config.use_latest_camera_info and self._latest_camera_info is not None:
                self._counts['camera_info_fallback'] += 1
                return self._latest_camera_info
            self._counts['camera_info_missing'] += 1
        raise PairingError(f'no CameraInfo with the image stamp within '
                           f'{config.camera_info_timeout_s} s of its arrival (set '
                           'use_latest_camera_info to fall back to the newest one)')

    def claim_stamp(self, frame):
        """Reserve the frame's stamp for publishing; returns '' or why it must not publish.

        After :meth:`stop` (the node deactivating while this frame was registered) nothing may
        publish.
        """
        with self._cond:
            if self._stopped:
                return 'the node stopped while the frame was registered'
            refusal = self.stamp_refusal(frame.stamp_ns, frame.tf_key)
            if refusal:
                self._counts['stamp_refused'] += 1
                return refusal
            last = self._last_published.get(frame.tf_key)
            if last is not None and frame.stamp_ns < last:
                self._counts['stamp_restarts'] += 1
            self._last_published[frame.tf_key] = frame.stamp_ns
            return ''

    def remember_pose(self, frame, pose, tracked=False):
        """Keep an accepted (published) pose as the start for tracking the next frames.

        ``tracked``: the pose itself came from tracking (counted as ``tracked``).
        """
        with self._cond:
            self._tracks[frame.tf_key] = (frame.stamp_ns, pose)
            self._counts['tracked'] += int(bool(tracked))

    def prior_pose(self, frame):
        """The pose to track this frame from, or None (tracking off, none yet, or stale)."""
        with self._cond:
            return tracking_start(self._tracks.get(frame.tf_key), frame.stamp_ns, self.config)

    def finish(self, frame, verdict, reason='', stamp_to_tf_ms=None):
        """Record a frame's verdict ('accepted', 'rejected' or 'error') and its latencies."""
        with self._cond:
            now = self._clock()
            self._counts[verdict] += 1
            self._arrival_to_verdict_ms.append((now - frame.received) * 1e3)
            if stamp_to_tf_ms is not None:
                self._stamp_to_tf_ms.append(float(stamp_to_tf_ms))
            _append_recent(self._verdict_times, now)
            self._last_verdict, self._last_reason = verdict, reason
            if frame is self._current:
                self._current = None

    def stop(self):
        """Wake and end :meth:`take` (on deactivate); a pending frame is dropped."""
        with self._cond:
            self._stopped = True
            self._pending = None
            self._cond.notify_all()

    def note_incompatible_publisher(self, policy):
        """DDS found a publisher of images whose QoS ``policy`` does not match ours."""
        with self._cond:
            self._counts['incompatible_publishers'] += 1
            self._incompatible_policy = str(policy)

    # ------------------------------------------------------------------------- reporting
    def warning(self, publishers):
        """Warnings about the input ('' when none).

        A publisher with incompatible QoS (its frames never arrive), and "no frames": the image
        topic has ``publishers``, the worker is idle and nothing at all arrived for
        ``no_frame_warning_s`` since activation.
        """
        config = self.config
        warnings = []
        with self._cond:
            if self._counts['incompatible_publishers']:
                warnings.append(
                    f"{self._counts['incompatible_publishers']} publisher(s) on "
                    f'{config.image_topic} offer QoS incompatible with image_qos='
                    f'{config.image_qos} (policy {self._incompatible_policy}): their frames '
                    'never arrive')
            silence = self._clock() - self._activated_at
            if (publishers > 0 and self._current is None and self._pending is None
                    and self._counts['received'] == 0 and silence > config.no_frame_warning_s):
                warnings.append(
                    f'{publishers} publisher(s) on {config.image_topic} but no frame arrived in '
                    f'{silence:.0f} s since activation: QoS or transport mismatch? (image_qos='
                    f'{config.image_qos}, transport profile: FASTRTPS_DEFAULT_PROFILES_FILE)')
        return '; '.join(warnings)

    def stats(self):
        """Counters, rates and latency percentiles of the current activation."""
        with self._cond:
            now = self._clock()
            verdict_p50, verdict_p95 = _percentiles(self._arrival_to_verdict_ms)
            tf_p50, tf_p95 = _percentiles(self._stamp_to_tf_ms)
            counts = self._counts

            def rate(times):
                return round(sum(now - t <= RATE_WINDOW_S for t in times) / RATE_WINDOW_S, 2)


            return {
                'frames_received': counts['received'],
                'frames_dropped': counts['dropped'],
                'accepted': counts['accepted'],
                'rejected': counts['rejected'],
                'errors': counts['error'],
                'stamp_refused': counts['stamp_refused'],
                'stamp_restarts': counts['stamp_restarts'],
                'tracked': counts['tracked'],
                'camera_info_paired': counts['camera_info_paired'],
                'camera_info_fallback': counts['camera_info_fallback'],
                'camera_info_missing': counts['camera_info_missing'],
                'incompatible_publishers': counts['incompatible_publishers'],
                'input_rate_hz': rate(self._arrivals),
                'processed_rate_hz': rate(self._verdict_times),
                'arrival_to_verdict_p50_ms': verdict_p50,
                'arrival_to_verdict_p95_ms': verdict_p95,
                'stamp_to_tf_p50_ms': tf_p50,
                'stamp_to_tf_p95_ms': tf_p95,
                'busy': self._current is not None,
                'last_verdict': self._last_verdict,
                'last_reason': self._last_reason,
            }
