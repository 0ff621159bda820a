"""Held-out X-ray appearance family, and the registration's accuracy and gates on it.

Training images (``simulate.xray_appearance``) are a bone-weighted monoenergetic line integral
through an exponential/gamma contrast with mild noise and flat collimation. This family is
rendered by a different recipe, so that a method tuned on one cannot pass for robust on the
other. Per view it draws:

* physics: CT split into soft tissue and bone mineral (``xray_physics``), a polyenergetic tube
  spectrum (60-120 kVp, 2.5-6 mm Al), attenuation from NIST tables (xraydb);
* a carbon-fibre table under the patient, and 0-3 implants (steel K-wires, titanium screws)
  near the bones;
* scatter (a blurred fraction of the primary, scatter-to-primary 0.3-1.2), the heel effect,
  quantum noise at fluoroscopy or spot-image dose, detector blur;
* C-arm processing: log, a window, a LUT (gamma or sigmoid), unsharp masking, 12/14/16-bit
  output, either polarity;
* collimation: none, iris, rectangular or asymmetric, with sharp or soft edges and a little
  transmission.

Nothing in training or in the gate thresholds was tuned on it. Run:

    .venv/bin/python bench/heldout_family.py [-n 8] [--refine-n 8] [--size 128] [--seed S [S ...]]
        [--groups G [G ...]] [--modes M [M ...]] [--params-file config/registration.yaml]

It prints per group (full, local, extreme) the fraction accepted, accepted median / p95 mTRE,
accepted gross failures, how many estimates lie within 5 mm whether accepted or not (the most a
perfect gate could accept: what the search and the start lose, apart from what the gates reject)
and how the published covariance fits the accepted errors, for SCR only,
with intensity refinement from the SCR pose, with the refinement alone started 5-15 mm / 2-5 deg
from the truth (the similarity and its gate on this appearance, apart from the network), and
started at the truth itself (``at_truth``: the most the gates can accept when the search cannot
fail, with the gate that rejected each view); writes bench/results/heldout_family.json, a plot of
the gate scores (the similarity, the drops to the probes across and along the beam and along the
flattest direction) against mTRE with each gate's threshold, bench/results/heldout_family.png, and
a contact sheet of the views. It also counts the views whose polarity (bright or dark bone) the
refinement chose right. Several seeds pool their views (each seed its own sample: acceptance moved
from 25 to 45 % between samples of one recipe), print the accepted count per seed, and add the
seeds to the names of the files written. ``--params-file`` measures the gates of a node parameter
file (its name is added to the files written), and so are the groups when ``--groups`` leaves some
out, so that runs of other groups on the same seeds do not overwrite each other's files.
"""
import argparse
from collections import Counter
from dataclasses import replace
import json
from pathlib import Path
import re
import sys

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xray_ct_reg import geometry, settings, simulate, xray_physics  # noqa: E402
from xray_ct_reg.evaluate import CHI2_6DOF_95, within_95  # noqa: E402

GROUPS = ('full', 'local', 'extreme')
# scr: SCR + PnP alone; refined: refinement from the SCR pose; near_truth / at_truth: the
# refinement alone from 5-15 mm / 2-5 deg off the truth, and from the truth
MODES = ('scr', 'refined', 'near_truth', 'at_truth')
SEED = 77031  # never used in training or by evaluate.py
TABLE_THICKNESS_MM = 15.0
TABLE_WIDTH_MM = 500.0


def _ray_cylinder_chord(source, directions, start, end, radius):
    """Length (mm) of each ray inside the finite cylinder of axis start->end and ``radius``."""
    axis = end - start
    length = np.linalg.norm(axis)
    axis = axis / length
    # closest approach between each ray and the axis line
    w0 = source - start
    b = directions @ axis
    d = directions @ w0
    e = w0 @ axis
    denominator = np.clip(1.0 - b * b, 1e-9, None)
    t_axis = (e - b * d) / denominator          # position along the axis
    t_ray = (b * e - d) / denominator           # position along the ray
    closest = source + t_ray[:, None] * directions - (start + t_axis[:, None] * axis)
    distance = np.linalg.norm(closest, axis=1)
    sine = np.sqrt(denominator)
    chord = 2.0 * np.sqrt(np.clip(radius ** 2 - distance ** 2, 0.0, None)) / sine
    inside = (t_axis >= 0.0) & (t_axis <= length)
    return np.where(inside, np.minimum(chord, length / np.maximum(np.abs(b), 1e-3)), 0.0)


def implants(rng, vertices):
    """0-3 implants near the bones: (material, start, end, radius) in CT mm."""
    found = []
    for _ in range(int(rng.integers(0, 4))):
        centre = vertices[rng.integers(len(vertices))]
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        if rng.random() < 0.5:
            material, length, radius = 'steel', rng.uniform(60, 150), rng.uniform(0.6, 1.2)
        else:
            material, length, radius = 'titanium', rng.uniform(30, 50), rng.uniform(2.5, 3.5)
        found.append((material, centre - direction * length / 2, centre + direction * length / 2,
                      radius))
    return found


def table_path(source, directions, posterior_y_mm):
    """Path length (mm) of each ray through a horizontal table slab below the patient (LPS)."""
    top, bottom = posterior_y_mm, posterior_y_mm + TABLE_THICKNESS_MM
    dy = np.where(np.abs(directions[:, 1]) < 1e-6, 1e-6, directions[:, 1])
    t_top, t_bottom = (top - source[1]) / dy, (bottom - source[1]) / dy
    t_in, t_out = np.minimum(t_top, t_bottom), np.maximum(t_top, t_bottom)
    lateral = source[0] + 0.5 * (t_in + t_out) * directions[:, 0]
    inside = (t_out > 0) & (np.abs(lateral) < TABLE_WIDTH_MM / 2)
    return np.where(inside, np.clip(t_out - np.maximum(t_in, 0.0), 0.0, 200.0), 0.0)


def collimator(rng, width, height):
    """Transmission map (H, W) of a drawn collimator: 1 in the field, 0.03-0.15 outside."""
    kind = rng.choice(['none', 'iris', 'rectangular', 'asymmetric'])
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    if kind == 'none':
        return np.ones((height, width)), kind
    if kind == 'iris':
        radius = rng.uniform(0.35, 0.5) * min(width, height)
        centre = np.array([width, height]) / 2 + rng.uniform(-0.08, 0.08, 2) * width
        field = (np.hypot(xx - centre[0], yy - centre[1]) <= radius).astype(float)
    else:
        low = rng.uniform(0.05, 0.25 if kind == 'rectangular' else 0.35, 2)
        high = 1.0 - (low if kind == 'rectangular' else rng.uniform(0.05, 0.35, 2))
        field = ((xx >= low[0] * width) & (xx <= high[0] * width)
                 & (yy >= low[1] * height) & (yy <= high[1] * height)).astype(float)
    soft = rng.uniform(0.0, 3.0)
    if soft > 0.3:
        field = cv2.GaussianBlur(field, (0, 0), soft)
    leak = rng.uniform(0.03, 0.15)
    return leak + (1.0 - leak) * field, kind


# Parts of the recipe ``render`` can leave out (for ablations, bench/depth_bias.py): scatter and
# the heel effect; collimator, implants and table; the window and LUT; unsharp masking; noise.
ABLATIONS = ('scatter_heel', 'collimator_metal_table', 'window_lut', 'unsharp', 'noise')


def render(projector, patient, pose, intrinsics, rng, without=()):
    """A held-out-family X-ray of ``pose``: (uint16 image, metadata dict).

    ``without`` names ABLATIONS to leave out. The draws are the same either way up to the
    Poisson noise, whose number of draws depends on the signal: after it (and in the views that
    follow from the same ``rng``) an ablated render differs from the full one, so ablations
    compare distributions, not pairs.
    """
    unknown = set(without) - set(ABLATIONS)
    if unknown:
        raise ValueError(f'unknown ablations {sorted(unknown)}; known: {ABLATIONS}')
    width, height = intrinsics.width, intrinsics.height
    soft, mineral = projector.render(pose, intrinsics)
    pixels = geometry.pixel_centers(width, height).reshape(-1, 2)
    source, directions = geometry.backproject_rays(pose, intrinsics.K, pixels)
    vertices = np.asarray(patient.mesh.vertices)
    paths = {'water': soft, 'bone_mineral': mineral}
    if 'collimator_metal_table' not in without:
        paths['carbon_fibre'] = table_path(source, directions,
                                           vertices[:, 1].max() + 40.0).reshape(height, width)
    metal = implants(rng, vertices)
    for material, start, end, radius in ([] if 'collimator_metal_table' in without else metal):
        chord = _ray_cylinder_chord(source, directions, start, end, radius).reshape(height, width)
        paths[material] = paths.get(material, 0.0) + chord
    kvp, filtration = rng.uniform(60, 120), rng.uniform(2.5, 6.0)
    primary = xray_physics.polyenergetic_intensity(
        paths, xray_physics.tube_spectrum(kvp, filtration))
    mm_per_px = intrinsics.pixel_spacing_mm
    scatter_ratio = rng.uniform(0.3, 1.2)
    scatter = cv2.GaussianBlur(primary, (0, 0), rng.uniform(15, 40) / mm_per_px)
    heel = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, height)[:, None]
    transmission, collimation = collimator(rng, width, height)
    if 'scatter_heel' in without:
        scatter_ratio, heel = 0.0, 1.0
    if 'collimator_metal_table' in without:
        transmission = np.ones_like(transmission)
    signal = (primary + scatter_ratio * scatter * primary.mean() / max(scatter.mean(), 1e-12))
    signal = signal * heel * transmission
    photons = rng.choice([rng.uniform(300, 3000), rng.uniform(5e3, 4e4)])  # fluoro or spot
    counts = rng.poisson(signal / signal.max() * photons).astype(float)
    if 'noise' in without:
        counts = signal / signal.max() * photons
    counts = cv2.GaussianBlur(counts, (0, 0), rng.uniform(0.3, 1.0))
    log = -np.log(np.maximum(counts, 0.5) / photons)          # bright bone
    field = transmission > 0.5 * transmission.max()  # auto-window on the exposed field
    low, high = np.percentile(log[field] if field.any() else log,
                              [rng.uniform(0.5, 3), rng.uniform(97, 99.5)])
    x = np.clip((log - low) / max(high - low, 1e-9), 0.0, 1.0)
    if 'window_lut' in without:
        x = (log - log.min()) / max(np.ptp(log), 1e-9)
    if rng.random() < 0.5:
        gamma = rng.uniform(0.6, 1.5)
        x = x if 'window_lut' in without else x ** gamma
    else:
        slope = rng.uniform(4, 9)
        if 'window_lut' not in without:
            x = 1.0 / (1.0 + np.exp(-slope * (x - 0.5)))
            x = (x - x.min()) / max(x.max() - x.min(), 1e-9)
    radius = rng.uniform(0.03, 0.1) * max(width, height)
    strength = rng.uniform(0.3, 1.5) * ('unsharp' not in without)
    x = np.clip(x + strength * (x - cv2.GaussianBlur(x, (0, 0), radius)), 0, 1)
    polarity = 'bright_bone' if rng.random() < 0.5 else 'dark_bone'
    if polarity == 'dark_bone':
        x = 1.0 - x
    bits = int(rng.choice([12, 14, 16]))
    image = np.round(x * (2 ** bits - 1)).astype(np.uint16)
    return image, {'kvp': kvp, 'filtration_mm_al': filtration, 'scatter_ratio': scatter_ratio,
                   'photons': photons, 'collimation': collimation, 'implants': len(metal),
                   'polarity': polarity, 'bits': bits}


def test_set(patient, projector, n_per_group, size=128, seed=SEED, groups=GROUPS, without=()):
    """Yield held-out cases: dicts with group, index, image, intrinsics, pose, recipe.

    ``without``: ABLATIONS left out of every view (``render``).
    """
    sampler = simulate.PoseSampler()
    vertices = np.asarray(patient.mesh.vertices)
    for group in groups:
        rng = np.random.default_rng([seed, GROUPS.index(group)])
        for index in range(n_per_group):
            pose, _ = sampler.sample(rng, vertices, patient.bone_centroid,
                                     extreme=group == 'extreme')
            intrinsics = geometry.default_intrinsics(size)
            if group == 'local':
                intrinsics = simulate.local_view_intrinsics(intrinsics, rng)
            image, recipe = render(projector, patient, pose, intrinsics, rng, without)
            yield {'group': group, 'index': index, 'image': image, 'intrinsics': intrinsics,
                   'pose': pose, 'recipe': recipe}


def _perturbed(pose, centre_ct, rng):
    """A close start: ``pose`` moved 5-15 mm and turned 2-5 deg about ``centre_ct``."""
    axis = rng.normal(size=3)
    direction = rng.normal(size=3)
    rotvec = axis / np.linalg.norm(axis) * np.radians(rng.uniform(2.0, 5.0))
    centre = geometry.transform_points(pose, np.asarray(centre_ct).reshape(1, 3))[0]
    shift = geometry.make_pose(
        np.eye(3), direction / np.linalg.norm(direction) * rng.uniform(5.0, 15.0))
    return geometry.compose(shift, geometry.rotation_about(rotvec, centre), pose)


def _refine_from(registrar, case, start):
    """Refine from ``start`` and judge with the registrar's intensity gates (a Result)."""
    from xray_ct_reg.register import Result, refine_and_judge
    pose, info, accepted, reason = refine_and_judge(
        registrar.projector, case['image'], case['intrinsics'], start, registrar.bone_centroid,
        registrar.config)
    return Result(pose=pose, accepted=accepted, reason=reason, scr_pose=start, refinement=info,
                  timings_ms={'total': info.time_s * 1e3})


def _gate(reason):
    """The gate a rejection reason names, without its numbers ('no sharp optimum')."""
    return re.split(r'[:(]|\s[-\d]', reason)[0].strip()


def _summary(records):
    """Per-group acceptance, accuracy of accepted estimates and rejections per gate."""
    accepted = [r['mtre_mm'] for r in records if r['accepted']]
    consistency = [r['covariance_m2'] for r in records if 'covariance_m2' in r]
    return {'rejected_by': dict(Counter(_gate(r['reason']) for r in records
                                        if not r['accepted'])),
            'n': len(records), 'accepted': len(accepted),
            'accepted_fraction': len(accepted) / max(len(records), 1),
            'accepted_mtre_p50_mm': float(np.median(accepted)) if accepted else None,
            'accepted_mtre_p95_mm': float(np.percentile(accepted, 95)) if accepted else None,
            'accepted_over_10mm': sum(m > 10.0 for m in accepted),
            # the published covariance against the accepted errors (evaluate.summarize_records)
            'covariance_m2_p50': float(np.median(consistency)) if consistency else None,
            'covariance_within_95': within_95(consistency) if consistency else None,
            'estimate_mtre_p50_mm': float(np.nanmedian([r['mtre_mm'] for r in records]))
            if records else None,
            # estimates within 5 mm, accepted or not: the most a perfect gate could accept
            'estimates_within_5mm': sum(r['mtre_mm'] < 5.0 for r in records),
            # the refinement's polarity (bright or dark bone) against the view's
            'polarity_right': sum(r.get('polarity_right', False) for r in records),
            'polarity_judged': sum('polarity_right' in r for r in records)}


def _plot(records, path, config):
    """Gate scores against mTRE, accepted and rejected, with each gate's threshold.

    Panels: the similarity at the refined pose, its drop to the best probe across the beam or
    turned, to the farther probes along the beam, along the flattest direction, and the smaller
    of that and the drop to a rival restart over the mismatch left; ``config`` the refined
    run's RegistrationConfig.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = (('ncc', f'{config.similarity} at the refined pose', config.min_ncc),
              ('across_drop', 'drop to the best probe across or turned', config.min_sharpness),
              ('depth_drop', 'drop along the beam', config.min_depth_sharpness),
              ('weak_margin', 'drop along the flattest direction', config.min_weak_sharpness),
              ('relative_weak_margin', 'that drop (or to a rival) / (1 - similarity)',
               config.min_relative_weak_sharpness))
    figure, axes = plt.subplots(1, len(panels), figsize=(25, 4))
    for axis, (key, label, threshold) in zip(axes, panels, strict=True):
        for accepted, marker, name in ((True, 'o', 'accepted'), (False, 'x', 'rejected')):
            chosen = [r for r in records if r['accepted'] == accepted and r.get(key) is not None
                      and np.isfinite(r[key])]
            axis.scatter([r['mtre_mm'] for r in chosen], [r[key] for r in chosen], marker=marker,
                         label=name)
        axis.axvline(10.0, color='grey', linestyle=':', label='gross failure (10 mm)')
        axis.axhline(threshold, color='red', linestyle='--', label='gate threshold')
        axis.set_xscale('log')
        axis.set_xlabel('mTRE of the refined pose (mm)')
        axis.set_ylabel(label)
    axes[0].set_title('held-out family, from SCR starts and near the truth')
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    """Evaluate the committed model on the held-out family; print, write JSON and plots."""
    from xray_ct_reg import ct
    from xray_ct_reg.register import Registrar, RegistrationConfig, to_jsonable
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default=str(REPO / 'models' / 'chest_example.pt'))
    parser.add_argument('-n', '--n-per-group', type=int, default=8)
    parser.add_argument('--refine-n', type=int, default=8, help='refined views per group')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--seed', type=int, nargs='+', default=[SEED],
                        help='test-set seeds (another than the default: a second sample; '
                             'several: their views pooled, each seed its own sample)')
    parser.add_argument('--groups', nargs='+', default=list(GROUPS), choices=GROUPS,
                        help='view groups to render and measure (default: all)')
    parser.add_argument('--similarity', default=None,
                        help='refine.SIMILARITIES name (default: the parameter file\'s, else '
                             f'{RegistrationConfig.similarity})')
    settings.add_params_file_argument(parser)
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    patient = ct.load_patient('example')
    projector = xray_physics.MaterialProjector(patient.ct)
    config = settings.build(RegistrationConfig, settings.read_node_values(args.params_file))
    if args.similarity is not None:
        config = replace(config, similarity=args.similarity)
    scr = Registrar.from_checkpoint(args.model, patient=patient,
                                    config=replace(config, intensity_refine=False))
    refined = Registrar(scr.model, scr.metadata, patient=patient,
                        config=replace(config, intensity_refine=True))
    groups = [group for group in GROUPS if group in args.groups]
    cases = [dict(case, seed=seed) for seed in args.seed for case in
             test_set(patient, projector, args.n_per_group, args.size, seed=seed, groups=groups)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ('' if config.similarity == RegistrationConfig.similarity
              else f'_{config.similarity}') + (
        f'_{Path(args.params_file).stem}' if args.params_file else '') + (
        '' if groups == list(GROUPS) else '_' + '_'.join(groups)) + (
        '' if args.seed == [SEED] else '_' + '_'.join(map(str, args.seed)))
    sheet = np.concatenate([np.concatenate([cv2.resize(
        (c['image'] / max(int(c['image'].max()), 1)).astype(np.float32), (96, 96))
        for c in cases[row * args.n_per_group:(row + 1) * args.n_per_group]], axis=1)
        for row in range(len(cases) // args.n_per_group)], axis=0)  # a row per seed and group
    cv2.imwrite(str(out / f'heldout_family_views{suffix}.png'),
                np.round(sheet * 255).astype(np.uint8))
    report = {'seeds': args.seed, 'size': args.size, 'model': args.model, 'modes': {}}
    rng = np.random.default_rng([*args.seed, 99])
    for mode, registrar, limit in (('scr', scr, args.n_per_group),
                                   ('refined', refined, args.refine_n),
                                   ('near_truth', refined, args.refine_n),
                                   ('at_truth', refined, args.refine_n)):
        if mode not in args.modes:
            continue
        records = []
        for case in cases:
            if case['index'] >= limit:
                continue
            if mode == 'near_truth':  # the refinement and its gates alone, from a close start
                result = _refine_from(registrar, case,
                                      _perturbed(case['pose'], patient.bone_centroid, rng))
            elif mode == 'at_truth':  # ... and from the truth: the gates' ceiling
                result = _refine_from(registrar, case, case['pose'])
            else:
                result = registrar.register(case['image'], case['intrinsics'])
            error = (geometry.mtre(result.pose, case['pose'], patient.targets)
                     if result.pose is not None else float('nan'))
            record = {'seed': case['seed'], 'group': case['group'], 'index': case['index'],
                      'recipe': case['recipe'],
                      'accepted': result.accepted, 'reason': result.reason, 'mtre_mm': error,
                      'time_ms': result.timings_ms.get('total')}
            if result.accepted and result.covariance is not None:
                record['covariance_m2'] = geometry.covariance_consistency(
                    result.pose, case['pose'], result.covariance)
            if result.refinement is not None:
                record.update(ncc=result.refinement.ncc_after,
                              polarity_right=bool((result.refinement.polarity > 0) == (
                                  case['recipe']['polarity'] == 'bright_bone')),
                              across_drop=result.refinement.across_drop,
                              depth_drop=result.refinement.depth_drop,
                              weak_margin=result.refinement.weak_margin,
                              relative_weak_margin=min(result.refinement.weak_margin,
                                                       result.refinement.rival_margin)
                              / max(1.0 - result.refinement.ncc_after, 1e-12),
                              start_mtre_mm=geometry.mtre(result.scr_pose, case['pose'],
                                                          patient.targets))
            records.append(record)
            print(f"{mode:8} {case['seed']:6d} {case['group']:8} {case['index']:2d} "
                  f"{'ACCEPT' if result.accepted else 'reject'} mTRE {error:8.1f} mm  "
                  f"{result.reason}", flush=True)
        report['modes'][mode] = {
            'groups': {g: _summary([r for r in records if r['group'] == g]) for g in groups},
            'records': records}
    refined_records = [record for mode in ('refined', 'near_truth') if mode in report['modes']
                       for record in report['modes'][mode]['records']]
    _plot(refined_records, out / f'heldout_family{suffix}.png', refined.config)
    print(f"\n{'mode':8} {'group':8} {'n':>3} {'acc':>4} {'acc p50':>8} {'acc p95':>8} "
          f"{'>10mm':>6} {'est p50':>8} {'est<5mm':>8}")
    for mode, data in report['modes'].items():
        for group, row in data['groups'].items():
            def fmt(value):
                return f'{value:8.2f}' if value is not None else f"{'-':>8}"
            print(f"{mode:8} {group:8} {row['n']:3d} {row['accepted']:4d} "
                  f"{fmt(row['accepted_mtre_p50_mm'])} {fmt(row['accepted_mtre_p95_mm'])} "
                  f"{row['accepted_over_10mm']:6d} {fmt(row['estimate_mtre_p50_mm'])} "
                  f"{row['estimates_within_5mm']:8d}")
    for mode, data in report['modes'].items():
        for group, row in data['groups'].items():
            if row['covariance_m2_p50'] is not None:
                print(f"{mode} {group} covariance: squared Mahalanobis distance of the accepted "
                      f"errors, median {row['covariance_m2_p50']:.1f} (5.35 if calibrated), "
                      f"{row['covariance_within_95']:.0%} within the 95 % bound {CHI2_6DOF_95}")
    for mode, data in report['modes'].items():
        for group, row in data['groups'].items():
            if row['polarity_judged']:
                wrong = [f"{r['seed']}/{r['index']} ({'accepted' if r['accepted'] else 'rejected'})"
                         for r in data['records'] if r['group'] == group
                         and r.get('polarity_right') is False]
                print(f"{mode} {group} polarity chosen right on {row['polarity_right']} of "
                      f"{row['polarity_judged']}" + (f"; wrong: {', '.join(wrong)}" if wrong
                                                     else ''))
    if len(args.seed) > 1:  # each seed's own sample: how much the figures move between them
        for mode, data in report['modes'].items():
            for group in groups:
                counts = []
                for seed in args.seed:
                    chosen = [r['accepted'] for r in data['records']
                              if r['seed'] == seed and r['group'] == group]
                    counts.append(f'{seed}: {sum(chosen)}/{len(chosen)}')
                print(f"{mode} {group} accepted per seed: {', '.join(counts)}")
    for mode, data in report['modes'].items():
        for group, row in data['groups'].items():
            if row['rejected_by']:
                print(f"{mode} {group} rejected by: " + ', '.join(
                    f'{gate} {count}' for gate, count in sorted(row['rejected_by'].items())))
    report['similarity'] = config.similarity
    report['params_file'] = args.params_file
    (out / f'heldout_family{suffix}.json').write_text(json.dumps(to_jsonable(report), indent=1))
    print(f'wrote {out}/heldout_family{suffix}.json and .png, heldout_family_views{suffix}.png')


if __name__ == '__main__':
    main()
