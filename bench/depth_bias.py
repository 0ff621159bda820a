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

A second table profiles the finest level's similarity along the beam through the truth
(``refine.depth_profile``, every PROFILE_STEP_MM to ±PROFILE_HALF_WIDTH_MM): where it peaks, and
how much it drops 10 mm away, plainly and as the gates' depth probe judges it (features weighted
by the distance from the focus of expansion; its floor is ``min_depth_sharpness``);
bench/results/depth_profile.png plots the median plain profile of each set.

    .venv/bin/python bench/depth_bias.py [-n 8]

Prints the tables and writes bench/results/depth_bias.json and depth_profile.png.
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
from xray_ct_reg.register import RegistrationConfig  # noqa: E402

SEED = 5150
GROUPS = ('full', 'extreme')
# (name, projector level, refine_pose arguments): single levels, then the default schedule
RUNS = (('32 px blurred', 0, {'levels': (32,), 'iterations': (10,),
                              'blur_px': refine.LEVEL_BLUR_PX[:1]}),
        ('32 px', 0, {'levels': (32,), 'iterations': (10,), 'blur_px': (0.0,)}),
        ('64 px', 1, {'levels': (64,), 'iterations': (10,), 'blur_px': (0.0,)}),
        ('default', None, {}))
PROFILE_HALF_WIDTH_MM = 20.0
PROFILE_STEP_MM = 2.5


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


def peak_offset(offsets, values):
    """Where ``values`` (at evenly spaced ``offsets``) peak: the best sample, then a parabola."""
    best = int(np.argmax(values))
    if 0 < best < len(values) - 1:
        before, at, after = values[best - 1:best + 2]
        curvature = before - 2.0 * at + after
        if curvature < 0:
            return float(offsets[best] + 0.5 * (before - after) / curvature
                         * (offsets[1] - offsets[0]))
    return float(offsets[best])


def profile_row(name, cases, projector, centre_ct, depth_floor):
    """The depth profiles of one set of views: peak offsets, drops 10 mm away, median profile."""
    offsets = np.arange(-PROFILE_HALF_WIDTH_MM, PROFILE_HALF_WIDTH_MM + 1e-9, PROFILE_STEP_MM)
    probes = [int(np.argmin(np.abs(offsets - sign * refine.DEPTH_PROBE_MM)))
              for sign in (-1.0, 1.0)]
    middle = int(np.argmin(np.abs(offsets)))
    profiles, weighted = (np.array([refine.depth_profile(
        projector, case['image'], case['intrinsics'], case['pose'], offsets, centre_ct,
        expansion_weighted=expansion_weighted) for case in cases])
        for expansion_weighted in (False, True))
    peaks = [peak_offset(offsets, profile) for profile in profiles]
    drops, gate_drops = (values[:, middle] - values[:, probes].max(axis=1)
                         for values in (profiles, weighted))
    return {'views': name, 'n': len(cases), 'offsets_mm': offsets.tolist(),
            'median_profile': np.median(profiles - profiles[:, middle:middle + 1],
                                        axis=0).tolist(),
            'peak_mm': peaks, 'abs_peak_p50_mm': float(np.median(np.abs(peaks))),
            'peaks_within_step': int(np.sum(np.abs(peaks) <= PROFILE_STEP_MM)),
            'drop_10mm': drops.tolist(), 'drop_10mm_p50': float(np.median(drops)),
            'drops_passing_gate': int(np.sum(drops >= depth_floor)),
            'gate_drop_10mm': gate_drops.tolist(),
            'gate_drop_10mm_p50': float(np.median(gate_drops)),
            'gate_drops_passing_gate': int(np.sum(gate_drops >= depth_floor))}


def plot_profiles(rows, path, depth_floor):
    """Median similarity along the beam (relative to the truth's) per set of views."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        bold = row['views'] in ('own', 'held-out', 'held-out, physics only')
        axis.plot(row['offsets_mm'], row['median_profile'], linewidth=2.0 if bold else 0.8,
                  alpha=1.0 if bold else 0.6, label=row['views'])
    axis.axhline(-depth_floor, color='grey', linestyle=':',
                 label=f'depth floor of the gates (asked {refine.DEPTH_SHARPNESS_PROBE_MM:.0f} mm '
                       'away, expansion-weighted)')
    axis.set_xlabel('offset along the beam from the true pose (mm)')
    axis.set_ylabel('similarity minus its value at the truth (median)')
    axis.set_title('finest level (64 px): how sharply the similarity peaks in depth')
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    """Refine from, and profile around, the truth on every set; print the tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-n', type=int, default=8, help='views per group (full, extreme)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    patient = ct.load_patient('example')
    projectors = refine.level_projectors(patient.ct)
    centre = np.reshape(patient.bone_centroid, (1, 3))
    rows, profiles = [], []
    depth_floor = RegistrationConfig().min_depth_sharpness
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
        profiles.append(profile_row(name, cases, projectors[-1], patient.bone_centroid,
                                    depth_floor))
    print(f"\n{'views':40s} {'n':>3s} {'|peak| p50':>10s} {f'peak <= {PROFILE_STEP_MM:g}':>11s} "
          f"{'drop 10mm p50':>13s} {f'drop >= {depth_floor:g}':>12s} {'gate drop p50':>13s} "
          f"{f'gate >= {depth_floor:g}':>12s}")
    for row in profiles:
        print(f"{row['views']:40s} {row['n']:3d} {row['abs_peak_p50_mm']:10.1f} "
              f"{row['peaks_within_step']:11d} {row['drop_10mm_p50']:13.3f} "
              f"{row['drops_passing_gate']:12d} {row['gate_drop_10mm_p50']:13.3f} "
              f"{row['gate_drops_passing_gate']:12d}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'depth_bias.json').write_text(json.dumps(
        {'n_per_group': args.n, 'groups': GROUPS, 'seed': SEED, 'rows': rows,
         'profiles': profiles}, indent=1))
    plot_profiles(profiles, out / 'depth_profile.png', depth_floor)
    print(f"wrote {out / 'depth_bias.json'} and depth_profile.png")


if __name__ == '__main__':
    main()
