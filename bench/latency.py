"""Per-stage registration latency (p50/p95 ms) of the committed model.

Inputs at the network size, 256 px and 1024x1024 mono16; with ``--refine`` also a tracked
frame (from the accepted pose moved by ``TRACKING_STEP``). Writes bench/results/latency.json.

    .venv/bin/python bench/latency.py [--model models/chest_example.pt] [--repeats 20] [--refine]

The network always runs at its trained resolution; larger inputs add only the resampling.
"""
import argparse
import json
from pathlib import Path
import platform
import sys

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xray_ct_reg import ct, geometry, simulate  # noqa: E402
from xray_ct_reg.evaluate import DEFAULT_SEED, STAGES  # noqa: E402
from xray_ct_reg.register import Registrar, RegistrationConfig, to_jsonable  # noqa: E402

# Motion between two frames of a sequence for the tracked timing: the prior pose is the
# accepted pose moved by this much (about 0.6 deg and 1.2 mm), so tracking has work to do.
TRACKING_STEP = geometry.pose_from_rotvec(np.radians([0.5, -0.3, 0.2]), [1.0, -0.5, 0.5])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default=str(REPO / 'models' / 'chest_example.pt'))
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--refine', action='store_true', help='also time intensity refinement')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'latency.json'))
    args = parser.parse_args()
    patient = ct.load_patient('example')
    simulator = simulate.Simulator(patient)
    rng = np.random.default_rng(DEFAULT_SEED + 1)
    pose, _ = simulate.PoseSampler().sample(rng, simulator.vertices, patient.bone_centroid)
    view = simulate.xray_appearance(
        simulator.projector.render(pose, geometry.default_intrinsics(256)), rng)
    configs = [('scr', RegistrationConfig())]
    if args.refine:
        configs.append(('scr+refine', RegistrationConfig(intensity_refine=True)))
    results = {'device': f'CPU ({platform.processor() or platform.machine()}), registration '
                         'on one torch thread (model.one_torch_thread)', 'repeats': args.repeats}
    for name, config in configs:
        registrar = Registrar.from_checkpoint(args.model, patient=patient, config=config)
        network = registrar.network_size[0]
        for size in sorted({network, 256, 1024}):
            image = cv2.resize(view, (size, size), interpolation=cv2.INTER_LINEAR)
            if size == 1024:
                image = np.round(image * 65535).astype(np.uint16)  # mono16 detector frame
            intrinsics = geometry.default_intrinsics(size)
            registrar.register(image, intrinsics)  # warm-up
            repeats = args.repeats if name == 'scr' else max(1, args.repeats // 5)
            runs = [registrar.register(image, intrinsics) for _ in range(repeats)]
            if name != 'scr' and runs[0].accepted:  # the next frame of a sequence: tracked
                prior = geometry.compose(TRACKING_STEP, runs[0].pose)  # the C-arm moved since
                tracked = [registrar.register(image, intrinsics, prior_pose=prior)
                           for _ in range(repeats)]
                values = [r.timings_ms['total'] for r in tracked]
                p50, p95 = np.percentile(values, [50, 95])
                results[f'{name} tracked {size}px'] = {
                    'tracked': all(r.tracked for r in tracked),
                    'stages_ms': {'total': {'p50': float(p50), 'p95': float(p95)}}}
                print(f'{name} tracked {size}px: tracked={all(r.tracked for r in tracked)} '
                      f'total {p50:.1f}/{p95:.1f}')
            stages = {}
            for stage in STAGES:
                values = [r.timings_ms[stage] for r in runs if stage in r.timings_ms]
                if values:
                    p50, p95 = np.percentile(values, [50, 95])
                    stages[stage] = {'p50': float(p50), 'p95': float(p95)}
            key = f'{name} {size}px' + (' mono16' if size == 1024 else '')
            results[key] = {'network_size': network, 'accepted': runs[0].accepted,
                            'stages_ms': stages}
            print(f'{key:26} accepted={runs[0].accepted!s:5} ' + '  '.join(
                f"{s} {v['p50']:.1f}/{v['p95']:.1f}" for s, v in stages.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(to_jsonable(results), indent=1))
    print(f'written {args.out} (ms, p50/p95)')


if __name__ == '__main__':
    main()
