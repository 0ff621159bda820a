"""Benchmark of the SCR network on CPU: parameters, FLOPs, forward latency, time per epoch.

Usage: ``python bench/train.py [--model models/chest_example.pt | --width W --depth D]
[--data DIR] [--threads 2]``. The network is the checkpoint's (default: the committed model;
its width, depth and input size) or, with ``--width``/``--depth``, an untrained one of that
shape. Forward latency is timed at the checkpoint's input size and at 128 and 256 px. Prints a
table and writes bench/results/train.json. With ``--data`` it also times one training epoch
(capped at ``--max-samples`` samples, extrapolated to the full split).
"""
import argparse
import json
from pathlib import Path
import platform
import sys
import time

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xray_ct_reg import model as scr  # noqa: E402
from xray_ct_reg import train as training  # noqa: E402


def forward_latency_ms(network, size, runs=50, warmup=5):
    """p50/p95 latency (ms) of one forward pass, batch 1, ``size`` x ``size``."""
    image = torch.rand(1, 1, size, size)
    times = []
    with torch.no_grad():
        for index in range(warmup + runs):
            start = time.perf_counter()
            network(image)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return {'p50': float(np.percentile(times, 50)), 'p95': float(np.percentile(times, 95))}


def epoch_time_s(data, config, max_samples):
    """Seconds for one training epoch over ``data`` (timed on up to ``max_samples`` samples)."""
    train_data = training.load_split(data, 'train')
    if config.size:
        train_data = training.resample_split(train_data, config.size)
    count = len(train_data['K'])
    timed = min(count, max_samples)
    network = scr.SCRNet(1, config.width, config.depth)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr)
    augmenter = training.Augmenter(config)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for first in range(0, timed, config.batch_size):
        indices = range(first, min(first + config.batch_size, timed))
        image, entry, exit_, bone = training.make_batch(train_data, indices, augmenter, rng)
        loss, _ = scr.scr_loss(network(image), network.normalise_coordinates(entry),
                               network.normalise_coordinates(exit_), bone)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    return {'samples': count, 'timed_samples': timed, 'samples_per_s': timed / elapsed,
            'epoch_s': elapsed * count / timed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default=str(REPO / 'models' / 'chest_example.pt'),
                        help='checkpoint whose network is timed')
    parser.add_argument('--data', help='dataset folder for the epoch timing')
    parser.add_argument('--width', type=int, default=None, help='untrained network of this width')
    parser.add_argument('--depth', type=int, default=None, help='... and depth')
    parser.add_argument('--train-size', type=int, default=None)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--runs', type=int, default=50)
    parser.add_argument('--max-samples', type=int, default=64)
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'train.json'))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [128, 256]
    if args.width is None and args.depth is None:
        network, metadata = scr.load_checkpoint(args.model)
        network = network.float().eval()
        sizes = sorted({int(max(metadata['image_size'])), *sizes})
        source = args.model
    else:
        defaults = training.TrainConfig
        network = scr.SCRNet(1, args.width or defaults.width, args.depth or defaults.depth).eval()
        source = 'untrained'
    width, depth = network.base_width, network.depth  # the timed network's own shape
    results = {'network': source, 'width': width, 'depth': depth,
               'threads': args.threads,
               'parameters': scr.count_parameters(network),
               'checkpoint_mb_fp16': 2 * scr.count_parameters(network) / 1e6,
               'machine': platform.processor() or platform.machine(),
               'torch': torch.__version__, 'latency_ms': {}, 'gflops': {}}
    for size in sizes:
        results['gflops'][size] = scr.count_flops(network, size)['flops'] / 1e9
        results['latency_ms'][size] = forward_latency_ms(network, size, args.runs)
    if args.data:
        config = training.TrainConfig(data=args.data, out='', width=width, depth=depth,
                                      size=args.train_size)
        results['epoch'] = epoch_time_s(args.data, config, args.max_samples)
    print(f"SCRNet ({source}) width {width} depth {depth}: "
          f"{results['parameters']:,} parameters "
          f"({results['checkpoint_mb_fp16']:.1f} MB fp16), {args.threads} threads")
    print(f"{'size':>6} {'GFLOPs':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for size in sizes:
        latency = results['latency_ms'][size]
        print(f"{size:>6} {results['gflops'][size]:>8.2f} {latency['p50']:>8.1f} "
              f"{latency['p95']:>8.1f}")
    if 'epoch' in results:
        epoch = results['epoch']
        print(f"epoch of {epoch['samples']} samples: {epoch['epoch_s']:.0f} s "
              f"({epoch['samples_per_s']:.1f} samples/s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
