"""Large-image transport over Fast DDS: how many full-size mono16 frames reach a subscriber.

Each cell runs a publisher process and a subscriber process (same environment, real rclpy +
rmw_fastrtps_cpp). The publisher sends ``--frames`` sensor_msgs/Image mono16 frames of the
cell's size at the cell's rate from a KEEP_LAST publisher of the cell's reliability; the
subscriber (``sensor_data`` = rclpy's qos_profile_sensor_data, or ``reliable`` = RELIABLE depth
2) counts what arrives, touching each frame's data. Both wait for matching before the first
frame, and the subscriber gets a grace period after the last. The matrix: 1024^2 and 1536^2 at
15 Hz and 1024^2 at 30 Hz; RELIABLE and BEST_EFFORT publishers; both subscriber QoS; with the
Fast DDS XML profile loaded in both processes (``FASTRTPS_DEFAULT_PROFILES_FILE``, set per
process here whatever the caller exported) and with no profile; plus a few cells where only
the subscriber or only the publisher loads it (outside clients may not). A reliable subscriber
cannot match a best-effort publisher: those cells are reported as n/a. Also records discovery
time, latency (header stamp to callback), CPU time, and the peak /dev/shm use of the Fast DDS
shared-memory files the two processes map.

Run it in the loopback sandbox (it refuses to run otherwise); the default run takes about
4.5 minutes on 2 cores:

    scripts/ros_sandbox.sh .venv/bin/python bench/transport.py [--frames 150]
        [--profile config/fastdds_profile.xml|none] [--only 1536,both]
        [--discovery-range LOCALHOST|SUBNET] [--late-publisher]

Prints a table and writes bench/results/transport.json.
"""
import argparse
from importlib.metadata import PackageNotFoundError, version
import json
import os
from pathlib import Path
import platform
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = REPO / 'config' / 'fastdds_profile.xml'
PROFILE_VARS = ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE')
SHM_DIR = Path('/dev/shm')
TAG = '@@'  # prefix of the protocol lines exchanged with the child processes


def percentiles(values):
    """p50/p95/max of a list (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)

    def pick(q):
        """The q-quantile (nearest rank)."""
        return round(ordered[int(round(q * (len(ordered) - 1)))], 2)
    return {'p50': pick(0.5), 'p95': pick(0.95), 'max': pick(1.0)}


def cpu_seconds():
    """User + system CPU time of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def say(kind, payload=None):
    """Print one protocol line to the parent."""
    print(f'{TAG}{kind} {json.dumps(payload)}', flush=True)


def stdin_watcher():
    """Queue of the lines arriving on stdin (EOF queues 'STOP')."""
    lines = queue.Queue()

    def pump():
        for line in sys.stdin:
            lines.put(line.strip())
        lines.put('STOP')
    threading.Thread(target=pump, daemon=True).start()
    return lines


def subscription_qos(name):
    """The subscriber QoS named on the command line."""
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    if name == 'sensor_data':
        return qos_profile_sensor_data
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2,
                      reliability=ReliabilityPolicy.RELIABLE)


def run_subscriber(args):
    """Child role: count the frames that arrive until the parent says STOP."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    commands = stdin_watcher()
    rclpy.init()
    node = Node('transport_bench_sub')
    expected = args.size * args.size * 2
    seen, latency_ms, bad = set(), [], [0]

    def on_image(msg):
        arrival = time.time_ns()
        if len(msg.data) != expected:
            bad[0] += 1
            return
        seen.add(int(msg.header.frame_id))
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        latency_ms.append((arrival - stamp) / 1e6)

    sub = node.create_subscription(Image, args.topic, on_image, subscription_qos(args.sub_qos))
    say('READY')
    matched, cpu_before = False, cpu_seconds()
    while True:
        rclpy.spin_once(node, timeout_sec=0.05)
        if not matched and sub.get_publisher_count() > 0:
            matched = True
            say('MATCHED')
        try:
            if commands.get_nowait() == 'STOP':
                break
        except queue.Empty:
            pass
    say('RESULT', {'received': len(seen), 'bad_size': bad[0],
                   'latency_ms': percentiles(latency_ms),
                   'sub_cpu_s': round(cpu_seconds() - cpu_before, 2)})
    node.destroy_node()
    rclpy.shutdown()


def run_publisher(args):
    """Child role: after GO, publish the frames at the requested rate, then wait for STOP."""
    import numpy as np
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    commands = stdin_watcher()
    rclpy.init()
    node = Node('transport_bench_pub')
    reliability = getattr(ReliabilityPolicy, args.pub_reliability)
    pub = node.create_publisher(Image, args.topic, QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=args.depth, reliability=reliability))
    ramp = np.arange(args.size * args.size, dtype=np.uint32) % 65536
    msg = Image(height=args.size, width=args.size, encoding='mono16', is_bigendian=0,
                step=args.size * 2)
    msg.data = ramp.astype('<u2').tobytes()
    say('READY')
    command = ''
    while pub.get_subscription_count() == 0 and command != 'STOP':
        try:
            command = commands.get(timeout=0.01)
        except queue.Empty:
            pass
    if command != 'STOP':
        say('MATCHED')
        while command not in ('GO', 'STOP'):
            command = commands.get()
    if command == 'STOP':
        node.destroy_node()
        rclpy.shutdown()
        return
    cpu_before, publish_ms, start = cpu_seconds(), [], time.monotonic()
    for i in range(args.frames):
        msg.header.frame_id = str(i)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(time.time_ns(), 1_000_000_000)
        before = time.perf_counter()
        pub.publish(msg)
        publish_ms.append((time.perf_counter() - before) * 1e3)
        time.sleep(max(0.0, start + (i + 1) / args.rate - time.monotonic()))
    seconds = time.monotonic() - start
    say('DONE', {'sent': args.frames, 'seconds': round(seconds, 3),
                 'achieved_hz': round(args.frames / seconds, 2),
                 'publish_ms': percentiles(publish_ms),
                 'pub_cpu_s': round(cpu_seconds() - cpu_before, 2)})
    while commands.get() != 'STOP':
        pass
    node.destroy_node()
    rclpy.shutdown()


class Child:
    """A role process of this script whose protocol lines and log lines are collected."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.events, self.log = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        """Sort the child's output into protocol events and log lines."""
        for line in self.proc.stdout:
            if line.startswith(TAG):
                kind, _, payload = line[len(TAG):].strip().partition(' ')
                self.events.put((kind, json.loads(payload)))
            elif line.strip():
                self.log.append(re.sub(r'\x1b\[[0-9;]*m', '', line.rstrip()))
        self.events.put(('EXIT', None))

    def expect(self, kind, timeout):
        """Wait for one protocol event of the given kind; returns its payload."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, payload = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f'no {kind} within {timeout} s') from None
            if got == kind:
                return payload
            if got == 'EXIT':
                raise RuntimeError(f'child exited before {kind}: ' + ' | '.join(self.log[-5:]))

    def send(self, line):
        """Write one command line to the child's stdin."""
        try:
            self.proc.stdin.write(line + '\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close(self, timeout=15.0):
        """Ask the child to stop, then SIGINT, then SIGKILL; returns how it ended."""
        self.send('STOP')
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        for how, wait in (('stopped', timeout), ('SIGINT', 5.0), ('SIGKILL', None)):
            if how == 'SIGINT':
                self.proc.send_signal(signal.SIGINT)
            elif how == 'SIGKILL':  # leaves its Fast DDS files in /dev/shm
                self.proc.kill()
            try:
                self.proc.wait(timeout=wait)
                return how
            except subprocess.TimeoutExpired:
                continue


class ShmSampler:
    """Peak /dev/shm use of the files the given processes map (their Fast DDS segments/ports)."""

    def __init__(self, pids):
        self.pids, self.seen = pids, set()
        self.peak = {'resident_mb': 0.0, 'apparent_mb': 0.0, 'files': 0, 'largest_mb': 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _mapped(self):
        """The /dev/shm files mapped by the processes now."""
        paths = set()
        for pid in self.pids():
            try:
                with open(f'/proc/{pid}/maps') as maps:
                    paths.update(line.split(None, 5)[5].strip() for line in maps
                                 if f' {SHM_DIR}/fastrtps_' in line
                                 or f' {SHM_DIR}/sem.fastrtps_' in line)
            except (OSError, IndexError):
                continue
        return paths

    def _sample(self):
        """One pass: sizes of the mapped files."""
        resident = apparent = largest = 0
        paths = self._mapped()
        self.seen |= paths
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError:
                continue
            resident += stat.st_blocks * 512
            apparent += stat.st_size
            largest = max(largest, stat.st_size)
        mb = 1024 * 1024
        for key, value in (('resident_mb', resident / mb), ('apparent_mb', apparent / mb),
                           ('files', len(paths)), ('largest_mb', largest / mb)):
            self.peak[key] = round(max(self.peak[key], value), 2)

    def _run(self):
        """Sample every 0.2 s until stopped."""
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self):
        """Stop sampling; returns the peaks."""
        self._stop.set()
        self._thread.join()
        return self.peak

    def leftovers(self):
        """The mapped files (and their lock files) still in /dev/shm after the processes."""
        left = [p + suffix for p in sorted(self.seen) for suffix in ('', '_el')
                if os.path.exists(p + suffix)]
        return [os.path.basename(p) for p in left]


def child_env(profile, discovery_range):
    """This environment with the Fast DDS profile variables set to profile (or unset)."""
    env = {k: v for k, v in os.environ.items() if k not in PROFILE_VARS}
    if profile is not None:
        env['FASTRTPS_DEFAULT_PROFILES_FILE'] = str(profile)
    if discovery_range == 'SUBNET':
        # Inside the loopback-only namespace SUBNET cannot leave the machine; with it
        # rmw_fastrtps uses the profile's transports as they are (LOCALHOST appends its own
        # default SHM and UDPv4 transports). Multicast is unavailable on lo: peer by unicast.
        env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'SUBNET'
        env['ROS_STATIC_PEERS'] = '127.0.0.1'
    return env


def run_cell(cell, index, args, profile):
    """Run one publisher/subscriber pair; returns the cell's result dict."""
    size, rate, pub_rel, sub_qos, arm = cell
    result = {'size': size, 'rate_hz': rate, 'pub_reliability': pub_rel, 'sub_qos': sub_qos,
              'profile': arm, 'sent': args.frames}
    if pub_rel == 'BEST_EFFORT' and sub_qos == 'reliable':
        result['status'] = 'n/a (incompatible QoS: reliable sub, best-effort pub)'
        return result
    common = ['--topic', f'/bench/transport_{os.getpid()}_{index}', '--size', str(size),
              '--rate', str(rate), '--frames', str(args.frames)]
    sub_env = child_env(profile if arm in ('both', 'sub-only') else None, args.discovery_range)
    pub_env = child_env(profile if arm in ('both', 'pub-only') else None, args.discovery_range)
    sub = pub = None
    shm = ShmSampler(lambda: [c.proc.pid for c in (sub, pub) if c is not None])
    try:
        sub = Child(['--role', 'sub', '--sub-qos', sub_qos, *common], sub_env)
        if args.late_publisher:
            sub.expect('READY', 60)
        pub = Child(['--role', 'pub', '--pub-reliability', pub_rel, '--depth', str(args.depth),
                     *common], pub_env)
        if not args.late_publisher:
            sub.expect('READY', 60)
        pub.expect('READY', 60)
        ready = time.monotonic()  # both endpoints exist: from here on it is discovery
        pub.expect('MATCHED', 60)
        sub.expect('MATCHED', 60)
        result['discovery_s'] = round(time.monotonic() - ready, 2)
        pub.send('GO')
        result.update(pub.expect('DONE', args.frames / rate * 3 + 60))
        time.sleep(args.grace)
        sub.send('STOP')
        result.update(sub.expect('RESULT', 30))
        result['status'] = 'ok'
    except (TimeoutError, RuntimeError) as error:
        result['status'] = f'error: {error}'
    finally:
        for name, child in (('pub', pub), ('sub', sub)):
            if child is not None:
                ended = child.close()
                if ended != 'stopped':
                    result[f'{name}_ended'] = ended
        result['shm_peak'] = shm.stop()
        result['shm_files_left'] = shm.leftovers()
    logs = [line for child in (sub, pub) if child for line in child.log]
    if logs:
        result['log_tail'] = logs[-10:]
    if 'received' in result:
        result['delivered'] = round(result['received'] / result['sent'], 4)
    return result


def matrix(profile_arms):
    """The cells (size, rate, publisher reliability, subscriber QoS, profile arm) to run."""
    cells = []
    for arm in profile_arms:
        for size, rate in ((1024, 15.0), (1536, 15.0), (1024, 30.0)):
            for pub_rel in ('RELIABLE', 'BEST_EFFORT'):
                for sub_qos in ('sensor_data', 'reliable'):
                    cells.append((size, rate, pub_rel, sub_qos, arm))
    if 'both' in profile_arms:
        # Outside clients may not load the profile: only one side loads it.
        for arm in ('sub-only', 'pub-only'):
            cells += [(1024, 30.0, 'BEST_EFFORT', 'sensor_data', arm),
                      (1024, 30.0, 'RELIABLE', 'sensor_data', arm),
                      (1536, 15.0, 'BEST_EFFORT', 'sensor_data', arm)]
    return cells


def label(result):
    """Short text naming a cell."""
    return (f"{result['size']}^2 @{result['rate_hz']:g}Hz  pub {result['pub_reliability']:<11} "
            f"sub {result['sub_qos']:<11} profile {result['profile']:<8}")


def orchestrate(args):
    """Run the matrix, print the table and write the JSON."""
    if os.environ.get('XRAY_CT_REG_SANDBOX') != '1':
        sys.exit('run this inside the loopback sandbox: scripts/ros_sandbox.sh '
                 '.venv/bin/python bench/transport.py')
    profile = None if args.profile == 'none' else Path(args.profile).resolve()
    if profile is not None and not profile.is_file():
        sys.exit(f'no such profile: {profile}')
    cells = matrix(['both', 'none'] if profile else ['none'])
    cells = [c for c in cells if not args.only or all(
        word in ' '.join(map(str, c)) for word in args.only.split(','))]
    try:
        fastdds = version('ros-fastrtps')
    except PackageNotFoundError:  # a ROS install rather than the PyPI wheels
        fastdds = 'unknown'
    print(f'Fast DDS {fastdds}, ROS_AUTOMATIC_DISCOVERY_RANGE={args.discovery_range}, '
          f'profile {profile or "none"}, {args.frames} frames per cell')
    results, load_before, started = [], os.getloadavg(), time.monotonic()
    print(f"{'cell':<70}{'received/sent':>14}{'disc s':>8}{'lat p50/p95 ms':>16}"
          f"{'shm MB':>8}", flush=True)
    for index, cell in enumerate(cells):
        result = run_cell(cell, index, args, profile)
        results.append(result)
        if result['status'] != 'ok':
            print(f'{label(result):<70}  {result["status"]}', flush=True)
            continue
        lat = result['latency_ms'] or {'p50': float('nan'), 'p95': float('nan')}
        verdict = 'ok' if result['delivered'] >= 0.99 else 'LOSS'
        print(f"{label(result):<70}{result['received']:>7}/{result['sent']:<6}"
              f"{result['discovery_s']:>8.2f}{lat['p50']:>8.1f}/{lat['p95']:<7.1f}"
              f"{result['shm_peak']['resident_mb']:>8.1f}  {verdict}", flush=True)
    out = {
        'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                    'loadavg_1m_before_after': [round(load_before[0], 2),
                                                round(os.getloadavg()[0], 2)]},
        'wall_s': round(time.monotonic() - started, 1),
        'discovery_range': args.discovery_range,
        'fastdds_version': fastdds,
        'rmw': os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp'),
        'profile_file': str(profile) if profile else None,
        'profile_env_var': 'FASTRTPS_DEFAULT_PROFILES_FILE',
        'late_publisher': args.late_publisher,
        'frames_per_cell': args.frames, 'publisher_depth': args.depth, 'grace_s': args.grace,
        'subscriber_qos': {'sensor_data': 'rclpy qos_profile_sensor_data (BEST_EFFORT, '
                                          'KEEP_LAST 5)',
                           'reliable': 'RELIABLE, KEEP_LAST 2'},
        'cells': results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f'wrote {args.out}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=150, help='frames per cell')
    parser.add_argument('--profile', default=str(DEFAULT_PROFILE),
                        help="Fast DDS XML profile for the 'both', 'sub-only' and 'pub-only' "
                             "arms, or 'none' to run only the no-profile arm")
    parser.add_argument('--depth', type=int, default=5, help='publisher KEEP_LAST depth')
    parser.add_argument('--grace', type=float, default=2.0,
                        help='seconds the subscriber keeps listening after the last frame')
    parser.add_argument('--discovery-range', choices=('LOCALHOST', 'SUBNET'),
                        default='LOCALHOST',
                        help='ROS_AUTOMATIC_DISCOVERY_RANGE of the children: LOCALHOST (as the '
                             'sandbox and the tests) or SUBNET (as a rig; with '
                             'ROS_STATIC_PEERS=127.0.0.1)')
    parser.add_argument('--late-publisher', action='store_true',
                        help='start the publisher only once the subscriber is up (a late '
                             'joiner; discovery then often waits for the next announcement)')
    parser.add_argument('--only', default='',
                        help='comma-separated words a cell must all contain, e.g. 1536,none')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'transport.json'),
                        help='JSON path')
    # Child-process roles (used internally).
    parser.add_argument('--role', choices=('pub', 'sub'), help=argparse.SUPPRESS)
    parser.add_argument('--topic', help=argparse.SUPPRESS)
    parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--rate', type=float, help=argparse.SUPPRESS)
    parser.add_argument('--pub-reliability', choices=('RELIABLE', 'BEST_EFFORT'),
                        help=argparse.SUPPRESS)
    parser.add_argument('--sub-qos', choices=('sensor_data', 'reliable'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == 'sub':
        run_subscriber(args)
    elif args.role == 'pub':
        run_publisher(args)
    else:
        orchestrate(args)


if __name__ == '__main__':
    main()
