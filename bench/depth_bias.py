"""Where the intensity refinement goes when started at the true pose, per appearance.

A similarity whose optimum sits at the truth keeps a refinement started there in place; one
biased by appearance the DRR does not model walks away. For full and extreme views of the
project's own simulator, of the held-out family (``bench/heldout_family.py``), of that
family with one part of its recipe left out (``heldout_family.ABLATIONS``) and with all of them
left out (its physics only: spectrum, materials, detector blur), the refinement
starts at the truth with a single level (its LM, depth line search and polish) at the coarse
level's settings (32 px, blurred by ``refine.LEVEL_BLUR_PX[0]``), the same unblurred, the fine
level's (64 px, unblurred), and with the whole default schedule. Reported per set: the median
and mean distance the bone centroid moved along the beam (depth) and across it, and the median
mTRE. (A refinement that finds nothing better than its start returns the start: 0.)

    .venv/bin/python bench/depth_bias.py [-n 8]

Prints a table and writes bench/results/depth_bias.json.
"""
import argparse
import json
from pathlib import Path
import sys

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

import heldout_family  # noqa: E402

from xray_ct_reg import ct, evaluate, geometry, refine, simulate, xray_physics  # noqa: E402

SEED = 5150
GROUPS = ('full', 'extreme')
# (name, projector level, refine_pose arguments): single levels, then the default schedule
RUNS = (('32 px blurred', 0, {'levels': (32,), 'iterations': (10,),
                              'blur_px': refine.LEVEL_BLUR_PX[:1]}),
        ('32 px', 0, {'levels': (32,), 'iterations': (10,), 'blur_px': (0.0,)}),
        ('64 px', 1, {'levels': (64,), 'iterations': (10,), 'blur_px': (0.0,)}),
        ('default', None, {}))


def view_sets(patient, n):
    """(set name, list of cases): own views, the held-out family, and its ablations."""
    simulator = simulate.Simulator(patient)
    yield 'own', list(evaluate.simulate_test_set(simulator, n, seed=SEED, groups=GROUPS))
    projector = xray_physics.MaterialProjector(patient.ct)
    for without in ((),) + tuple((name,) for name in heldout_family.ABLATIONS) + (
            heldout_family.ABLATIONS,):
        name = ('held-out, physics only' if without == heldout_family.ABLATIONS else
                'held-out' + ''.join(f' -{part}' for part in without))
        yield name, list(heldout_family.test_set(patient, projector, n, groups=GROUPS,
                                                 without=without))


def displacement(pose, truth, centre_ct):
    """(depth, across) mm: how far ``pose`` moves the centre along and across the beam."""
    moved = geometry.transform_points(pose, centre_ct)[0]
    true = geometry.transform_points(truth, centre_ct)[0]
    beam = true / np.linalg.norm(true)
    shift = moved - true
    depth = float(shift @ beam)
    return depth, float(np.linalg.norm(shift - depth * beam))


def main():
    """Refine from the truth on every set; print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-n', type=int, default=8, help='views per group (full, extreme)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    patient = ct.load_patient('example')
    projectors = refine.level_projectors(patient.ct)
    centre = np.reshape(patient.bone_centroid, (1, 3))
    rows = []
    print(f"{'views':40s} {'refinement':14s} {'n':>3s} {'|depth| p50':>11s} {'mean':>6s} "
          f"{'across p50':>10s} {'mTRE p50':>8s}")
    for name, cases in view_sets(patient, args.n):
        for run, level, schedule in RUNS:
            used = projectors if level is None else projectors[level]
            depths, across, errors = [], [], []
            for case in cases:
                pose, _ = refine.refine_pose(used, case['image'], case['intrinsics'],
                                             case['pose'], centre_ct=patient.bone_centroid,
                                             **schedule)
                depth, side = displacement(pose, case['pose'], centre)
                depths.append(depth)
                across.append(side)
                errors.append(float(geometry.mtre(pose, case['pose'], patient.targets)))
            row = {'views': name, 'refinement': run, 'n': len(cases), 'depth_mm': depths,
                   'across_mm': across, 'mtre_mm': errors,
                   'abs_depth_p50_mm': float(np.median(np.abs(depths))),
                   'abs_depth_mean_mm': float(np.mean(np.abs(depths))),
                   'across_p50_mm': float(np.median(across)),
                   'mtre_p50_mm': float(np.median(errors))}
            rows.append(row)
            print(f"{name:40s} {run:14s} {row['n']:3d} {row['abs_depth_p50_mm']:11.1f} "
                  f"{row['abs_depth_mean_mm']:6.1f} {row['across_p50_mm']:10.1f} "
                  f"{row['mtre_p50_mm']:8.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'depth_bias.json').write_text(json.dumps(
        {'n_per_group': args.n, 'groups': GROUPS, 'seed': SEED, 'rows': rows}, indent=1))
    print(f"wrote {out / 'depth_bias.json'}")


if __name__ == '__main__':
    main()
