"""Benchmark of the simulator: patient preparation (cold/warm cache), samples/s, DRR, ray casting.

Usage: .venv/bin/python bench/simulate.py [--ct example] [--samples 40] [--out FILE]
"""
import argparse
import json
import os
from pathlib import Path
import platform
import tempfile
import time

import numpy as np
import torch

from xray_ct_reg import geometry, simulate
from xray_ct_reg.ct import load_patient


def time_views(simulator, size, count, seed=0):
    """Mean ms per view for DRR, ray casting and a whole random view, plus samples/s."""
    rng = np.random.default_rng(seed)
    sampler = simulate.PoseSampler()
    intrinsics = geometry.default_intrinsics(size)
    poses = [sampler.sample(rng, simulator.vertices, simulator.patient.bone_centroid)[0]
             for _ in range(count)]
    start = time.perf_counter()
    for pose in poses:
        simulator.projector.render(pose, intrinsics)
    drr_ms = (time.perf_counter() - start) / count * 1000
    start = time.perf_counter()
    for pose in poses:
        simulate.raycast_scene_coordinates(simulator.scene, pose, intrinsics, simulator.bounds)
    raycast_ms = (time.perf_counter() - start) / count * 1000
    start = time.perf_counter()
    for _ in range(count):
        simulator.random_view(rng, size, sampler)
    total = time.perf_counter() - start
    return {'size': size, 'views': count, 'drr_ms': drr_ms, 'raycast_ms': raycast_ms,
            'view_ms': total / count * 1000, 'samples_per_s': count / total}


def main():
    """Run the benchmark, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--ct', default='example')
    parser.add_argument('--samples', type=int, default=40)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'simulate.json'))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                           'torch_threads': torch.get_num_threads(),
                           'load_average': os.getloadavg()}}
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get('XRAY_CT_REG_CACHE')
        os.environ['XRAY_CT_REG_CACHE'] = cache
        start = time.perf_counter()
        load_patient(args.ct)
        results['patient_cold_s'] = time.perf_counter() - start
        start = time.perf_counter()
        patient = load_patient(args.ct)
        results['patient_warm_s'] = time.perf_counter() - start
        if previous is None:
            del os.environ['XRAY_CT_REG_CACHE']
        else:
            os.environ['XRAY_CT_REG_CACHE'] = previous
    start = time.perf_counter()
    simulator = simulate.Simulator(patient)
    results['simulator_init_s'] = time.perf_counter() - start
    results['views'] = [time_views(simulator, size, args.samples) for size in (128, 256)]
    print(f"patient preparation: cold {results['patient_cold_s']:.1f} s, warm (mesh cache) "
          f"{results['patient_warm_s']:.1f} s; simulator init (DRR volume, scene) "
          f"{results['simulator_init_s']:.1f} s; load average {results['machine']['load_average']}")
    header = ('size', 'views', 'DRR ms', 'raycast ms', 'view ms', 'views/s')
    print(' '.join(f'{name:>10}' for name in header))
    for row in results['views']:
        print(f"{row['size']:>10} {row['views']:>10} {row['drr_ms']:>10.1f} "
              f"{row['raycast_ms']:>10.1f} {row['view_ms']:>10.1f} {row['samples_per_s']:>10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
