"""Registration accuracy on held-out simulated views, and the ``evaluate`` CLI.

The test set is simulated from the patient's CT with a seed never used in training (training
uses small seeds), in three groups: ``full`` views (``simulate.PoseSampler``), ``local`` views
(a random crop of the detector, ``simulate.local_view_intrinsics``) and ``extreme`` views (every
angle and offset at an edge of the sampler's ranges). Views alternate between bright-bone and
dark-bone appearance, and some are collimated. Metrics follow the paper (``geometry``): mTRE
percentiles, mean and std, projected distance, gross failure (mTRE > 10 mm); plus the rejection
rate and whether the rejected frames were really failures.
"""
from dataclasses import asdict, replace
import json
from pathlib import Path
import sys

import cv2
import numpy as np
from tqdm import tqdm

from xray_ct_reg import ct as ct_module
from xray_ct_reg import geometry, overlay, settings, simulate
from xray_ct_reg.register import Registrar, RegistrationConfig, cli_config, to_jsonable

GROUPS = ('full', 'local', 'extreme')
POLARITIES = ('bright_bone', 'dark_bone')
DEFAULT_SEED = 20231001
STAGES = ('preprocess', 'network', 'pnp', 'polish', 'intensity_refine', 'total')
CHI2_6DOF_95 = 12.59  # 95 % quantile of the chi-square law with 6 degrees of freedom


def within_95(squared_distances):
    """Fraction of squared Mahalanobis distances inside the 6-dof 95 % bound (NaN for none).

    0.95 when the published covariance is calibrated; fewer means it is optimistic.
    """
    values = np.asarray(squared_distances, dtype=float)
    return float(np.mean(values < CHI2_6DOF_95)) if values.size else np.nan


def simulate_test_set(simulator, n_per_group, seed=DEFAULT_SEED, size=128, groups=GROUPS):
    """Yield held-out test cases: dicts with group, index, polarity, image, intrinsics, pose.

    Each group draws from its own generator (``seed``, group index), so a group's views do not
    depend on ``n_per_group`` of the others. Half the views of each group are bright-bone.
    """
    for group in groups:
        rng = np.random.default_rng([seed, GROUPS.index(group)])
        for index in range(n_per_group):
            sample, _ = simulator.random_view(
                rng, size, local_fraction=1.0 if group == 'local' else 0.0,
                collimation_fraction=0.3, extreme=group == 'extreme')
            polarity = POLARITIES[index % 2]
            image = simulate.xray_appearance(sample['line_integral'], rng, polarity=polarity,
                                             collimation=sample['collimation'])
            intrinsics = geometry.Intrinsics(sample['K'], size, size, sample['sdd_mm'])
            yield {'group': group, 'index': index, 'polarity': polarity, 'image': image,
                   'intrinsics': intrinsics, 'pose': sample['pose']}


def score_case(case, result, patient):
    """Per-frame record: verdict, errors of the estimate (NaN when none), timings."""
    truth, estimate, intrinsics = case['pose'], result.pose, case['intrinsics']
    record = {'group': case['group'], 'index': case['index'], 'polarity': case['polarity'],
              'accepted': result.accepted, 'reason': result.reason,
              'inlier_count': result.inlier_count, 'inlier_ratio': result.inlier_ratio,
              'reprojection_error_px': result.reprojection_error_px,
              'timings_ms': dict(result.timings_ms),
              'mtre_mm': np.nan, 'mpd_mm': np.nan, 'rotation_deg': np.nan,
              'translation_mm': np.nan}
    refined = result.refinement
    if refined is not None:  # the PnP start of the refinement and the similarity it reached
        record.update(start_mtre_mm=geometry.mtre(result.scr_pose, truth, patient.targets),
                      ncc=refined.ncc_after, exposed_fraction=refined.exposed_fraction)
    if estimate is not None:
        record.update(
            mtre_mm=geometry.mtre(estimate, truth, patient.targets),
            mpd_mm=geometry.projected_distance_mm(estimate, truth, patient.targets, intrinsics),
            rotation_deg=geometry.rotation_error_deg(estimate, truth),
            translation_mm=geometry.translation_error_mm(estimate, truth))
        if result.covariance is not None:
            record['covariance_m2'] = geometry.covariance_consistency(estimate, truth,
                                                                      result.covariance)
    return record


def summarize_records(records):
    """Group summary: accuracy of accepted frames, failure/rejection rates, stage timings."""
    n = len(records)
    accepted = [r for r in records if r['accepted']]
    rejected = [r for r in records if not r['accepted']]
    consistency = [r['covariance_m2'] for r in accepted if 'covariance_m2' in r]

    def failed(record):
        return not np.isfinite(record['mtre_mm']) or geometry.is_gross_failure(record['mtre_mm'])

    timings = {}
    for stage in STAGES:
        values = [r['timings_ms'][stage] for r in records if stage in r['timings_ms']]
        if values:
            p50, p95 = np.percentile(values, [50, 95])
            timings[stage] = {'p50': float(p50), 'p95': float(p95)}
    return {
        'n': n,
        'accepted': len(accepted),
        'mtre_mm': geometry.summarize_mtre([r['mtre_mm'] for r in accepted]),
        # every estimate, accepted or not: what SCR + PnP achieve before the gates decide
        'mtre_estimates_mm': geometry.summarize_mtre(
            [r['mtre_mm'] for r in records if np.isfinite(r['mtre_mm'])]),
        'mpd_mm': geometry.summarize([r['mpd_mm'] for r in accepted]),
        'rotation_deg': geometry.summarize([r['rotation_deg'] for r in accepted]),
        'translation_mm': geometry.summarize([r['translation_mm'] for r in accepted]),
        # how honest the published covariance is: median 5.35 and 95 % within 12.59 (the
        # chi-square law of 6 dof) if calibrated
        'covariance_m2': geometry.summarize(consistency),
        'covariance_within_95': within_95(consistency),
        'gross_failure_rate_all': (sum(failed(r) for r in records) / n) if n else np.nan,
        'gross_failure_rate_accepted': (sum(failed(r) for r in accepted) / len(accepted)
                                        if accepted else np.nan),
        'rejection_rate': len(rejected) / n if n else np.nan,
        'rejected_true_failures': sum(failed(r) for r in rejected),
        'rejected': len(rejected),
        'rejection_reasons': sorted({r['reason'].split(':')[0] for r in rejected}),
        'timings_ms': timings,
    }


def plot_errors(records, path):
    """PNG with the mTRE CDF per group (accepted frames) and a histogram of all mTREs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, (cdf_axes, histogram_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for group in GROUPS:
        values = np.sort([r['mtre_mm'] for r in records if r['group'] == group
                          and r['accepted']])
        if values.size:
            cdf_axes.step(values, np.arange(1, values.size + 1) / values.size, where='post',
                          label=f'{group} (n={values.size})')
    cdf_axes.axvline(geometry.GROSS_FAILURE_MM, color='grey', linestyle='--')
    cdf_axes.set(xscale='log', xlabel='mTRE (mm), accepted frames', ylabel='fraction',
                 title='mTRE CDF per group')
    if cdf_axes.get_legend_handles_labels()[0]:
        cdf_axes.legend()
    values = [r['mtre_mm'] for r in records if np.isfinite(r['mtre_mm'])]
    if values:
        bins = np.logspace(np.log10(max(min(values), 1e-2)), np.log10(max(values) + 1e-9), 30)
        for accepted, label in ((True, 'accepted'), (False, 'rejected')):
            subset = [r['mtre_mm'] for r in records if np.isfinite(r['mtre_mm'])
                      and r['accepted'] == accepted]
            histogram_axes.hist(subset, bins=bins, alpha=0.6, label=label)
    histogram_axes.set(xscale='log', xlabel='mTRE (mm) of every estimate', ylabel='frames',
                       title='mTRE histogram')
    histogram_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate(checkpoint, ct='example', n_per_group=20, seed=DEFAULT_SEED, size=None,
             config=None, intensity_refine=False, out_dir=None, progress=True):
    """Register a held-out simulated test set and report accuracy per group.

    ``ct`` is a CT path, 'example', or an already loaded ``ct.Patient``; ``size`` the simulated
    image size (default: the network's). Writes ``evaluation.json``, ``evaluation.png`` and
    best/median/worst overlays to ``out_dir`` when given. Returns the report dict
    (``groups`` -> summaries, ``all``, ``records``).
    """
    patient = ct if isinstance(ct, ct_module.Patient) else ct_module.load_patient(ct)
    config = replace(config or RegistrationConfig(), intensity_refine=bool(intensity_refine))
    registrar = Registrar.from_checkpoint(checkpoint, patient=patient, config=config)
    size = size or registrar.network_size[0]
    simulator = simulate.Simulator(patient)
    records, cases = [], []
    bar = tqdm(total=n_per_group * len(GROUPS), desc='evaluate', disable=not progress,
               file=sys.stderr)
    for case in simulate_test_set(simulator, n_per_group, seed, size):
        result = registrar.register(case['image'], case['intrinsics'])
        records.append(score_case(case, result, patient))
        cases.append((case, result))
        bar.set_postfix(mtre=f"{records[-1]['mtre_mm']:.1f}", ok=result.accepted)
        bar.update()
    bar.close()
    report = {
        'checkpoint': str(checkpoint), 'ct_sha256': patient.ct_sha256, 'seed': seed,
        'size': size, 'n_per_group': n_per_group, 'intensity_refine': bool(intensity_refine),
        'config': asdict(config),
        'groups': {g: summarize_records([r for r in records if r['group'] == g])
                   for g in GROUPS},
        'all': summarize_records(records),
        'records': records,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'evaluation.json').write_text(json.dumps(to_jsonable(report), indent=1))
        plot_errors(records, out / 'evaluation.png')
        estimated = sorted((r['mtre_mm'], i) for i, r in enumerate(records)
                           if np.isfinite(r['mtre_mm']))
        if estimated:
            picks = {'best': estimated[0], 'median': estimated[len(estimated) // 2],
                     'worst': estimated[-1]}
            for name, (error, i) in picks.items():
                case, result = cases[i]
                verdict = 'accepted' if result.accepted else f'rejected: {result.reason}'
                text = f"{case['group']} {case['polarity']} mTRE {error:.1f} mm, {verdict}"
                picture = overlay.draw_overlay(case['image'], result.pose, case['intrinsics'],
                                               patient, text=text)
                truth = overlay.bone_mask(case['pose'], case['intrinsics'], patient.mesh)
                contours, _ = cv2.findContours(truth, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(picture, contours, -1, (255, 128, 0), 1)
                cv2.imwrite(str(out / f'overlay_{name}.png'), picture)
    return report


def _cell(value, width, spec='.2f', align='>'):
    """``value`` formatted by ``spec`` in ``width`` characters; '-' when it is NaN (no data)."""
    return format('-' if np.isnan(value) else format(value, spec), f'{align}{width}')


def format_table(report):
    """Printable table: one row per group and one for all frames ('-': no accepted frame)."""
    header = (f"{'group':8} {'n':>4} {'acc':>4} {'p25':>6} {'p50':>6} {'p95':>6} "
              f"{'mean±std':>13} {'mPD p50':>8} {'GFR all':>8} {'GFR acc':>8} {'rej':>5} "
              f"{'rej=fail':>8} {'est p50':>8} {'total p50/p95 ms':>17}")
    lines = [header, '-' * len(header)]
    for name, summary in list(report['groups'].items()) + [('all', report['all'])]:
        m = summary['mtre_mm']
        total = summary['timings_ms'].get('total', {'p50': np.nan, 'p95': np.nan})
        lines.append(
            f"{name:8} {summary['n']:>4} {summary['accepted']:>4} {_cell(m['p25'], 6)} "
            f"{_cell(m['p50'], 6)} {_cell(m['p95'], 6)} {_cell(m['mean'], 6)}±"
            f"{_cell(m['std'], 6, align='<')} {_cell(summary['mpd_mm']['p50'], 8)} "
            f"{_cell(summary['gross_failure_rate_all'], 8, '.1%')} "
            f"{_cell(summary['gross_failure_rate_accepted'], 8, '.1%')} "
            f"{_cell(summary['rejection_rate'], 5, '.0%')} "
            f"{summary['rejected_true_failures']:>3}/{summary['rejected']:<4} "
            f"{_cell(summary['mtre_estimates_mm']['p50'], 8)} "
            f"{_cell(total['p50'], 8, '.0f')}/{_cell(total['p95'], 8, '.0f', '<')}")
    lines.append('mTRE in mm over accepted frames; GFR all: estimates missing or > 10 mm, '
                 'accepted or not; '
                 'rej=fail: rejected frames whose estimate was a gross failure or missing; '
                 'est p50: median mTRE of every estimate, accepted or not.')
    everything = report['all']
    lines.append(f"covariance: squared Mahalanobis distance of the accepted errors, median "
                 f"{_cell(everything['covariance_m2']['p50'], 0, '.1f')} (5.35 if calibrated), "
                 f"{_cell(everything['covariance_within_95'], 0, '.0%')} within the 95 % bound "
                 f"{CHI2_6DOF_95}: fewer means the published covariance is optimistic.")
    return '\n'.join(lines)


def add_evaluate_arguments(parser):
    """Arguments of ``xray-ct-reg evaluate``."""
    parser.add_argument('--model', required=True, help='checkpoint (.pt)')
    parser.add_argument('--ct', default=None,
                        help="the model's CT (file, folder, 'example'); default: ct_path of "
                             "--params-file, else 'example'")
    parser.add_argument('-n', '--n-per-group', type=int, default=20,
                        help='test views per group (full, local, extreme)')
    parser.add_argument('--seed', type=int, default=DEFAULT_SEED,
                        help='test-set seed (never used in training)')
    parser.add_argument('--size', type=int, default=None,
                        help="simulated image size (px), default: the network's")
    parser.add_argument('--refine', action='store_true', help='with intensity refinement')
    settings.add_params_file_argument(parser)
    parser.add_argument('--out', default='runs/evaluate', help='output folder')


def run_evaluate(args):
    """Evaluate a checkpoint and print the table; 1 on an unusable model or CT."""
    try:
        config, ct_path, _ = cli_config(args)
        report = evaluate(args.model, ct_path or 'example', args.n_per_group, args.seed, args.size,
                          config=config, intensity_refine=config.intensity_refine,
                          out_dir=args.out)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(format_table(report))
    print(f'written to {args.out}/evaluation.json, evaluation.png, overlay_*.png')
    return 0
