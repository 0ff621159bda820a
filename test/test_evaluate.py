"""Evaluation: metric bookkeeping on synthetic records, and a whole evaluate() run.

The run uses an untrained network (plumbing, files, JSON); accuracy itself is measured by
bench/accuracy.py.
"""
import json

import numpy as np
import pytest

from xray_ct_reg import evaluate


def _record(group, accepted, mtre_mm, reason=''):
    return {'group': group, 'accepted': accepted, 'reason': reason, 'mtre_mm': mtre_mm,
            'mpd_mm': mtre_mm / 2, 'rotation_deg': 0.1, 'translation_mm': mtre_mm,
            'timings_ms': {'total': 10.0 if accepted else 5.0, 'network': 2.0}}


def test_summary_counts_failures_and_rejections():
    records = [_record('full', True, 2.0), _record('full', True, 3.0),
               _record('full', True, 30.0),  # accepted gross failure
               _record('full', False, 50.0, 'too few inliers: 3 < 50'),  # rightly rejected
               _record('full', False, 1.0, 'inlier ratio 0.1 < 0.25'),  # wrongly rejected
               _record('full', False, np.nan, 'PnP found no pose')]
    summary = evaluate.summarize_records(records)
    assert summary['n'] == 6 and summary['accepted'] == 3
    assert summary['mtre_mm']['p50'] == 3.0
    assert summary['gross_failure_rate_accepted'] == pytest.approx(1 / 3)
    assert summary['gross_failure_rate_all'] == pytest.approx(3 / 6)
    assert summary['rejection_rate'] == pytest.approx(0.5)
    assert summary['rejected_true_failures'] == 2 and summary['rejected'] == 3
    assert summary['rejection_reasons'] == ['PnP found no pose', 'inlier ratio 0.1 < 0.25',
                                            'too few inliers']
    assert summary['timings_ms']['total']['p50'] == pytest.approx(7.5)
    assert 'pnp' not in summary['timings_ms']


def test_summary_and_table_report_how_honest_the_covariance_is():
    """The accepted frames' squared Mahalanobis distances: median and share within 12.59."""
    records = [dict(_record('full', True, 1.0), covariance_m2=m2) for m2 in (2.0, 6.0, 40.0)]
    records.append(dict(_record('full', False, 50.0, 'no sharp optimum'), covariance_m2=900.0))
    summary = evaluate.summarize_records(records)
    assert summary['covariance_m2']['p50'] == 6.0
    assert summary['covariance_within_95'] == pytest.approx(2 / 3)
    table = evaluate.format_table({'groups': {'full': summary}, 'all': summary})
    assert 'median 6.0 (5.35 if calibrated), 67% within' in table


def test_summary_of_an_empty_group_is_nan_not_an_error():
    summary = evaluate.summarize_records([])
    assert summary['n'] == 0 and np.isnan(summary['mtre_mm']['p50'])


def test_plot_and_table(tmp_path):
    rng = np.random.default_rng(0)
    records = [_record(g, bool(rng.random() < 0.8), float(rng.lognormal(1, 1)))
               for g in evaluate.GROUPS for _ in range(10)]
    evaluate.plot_errors(records, tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').stat().st_size > 1000
    report = {'groups': {g: evaluate.summarize_records([r for r in records if r['group'] == g])
                         for g in evaluate.GROUPS}, 'all': evaluate.summarize_records(records)}
    table = evaluate.format_table(report)
    assert all(name in table for name in evaluate.GROUPS + ('all',))
    # a group with no accepted frame shows '-' for what it cannot have, never 'nan'
    rejected = [_record('full', False, 3.0), _record('full', False, 40.0)]
    empty = evaluate.summarize_records(rejected)
    row = evaluate.format_table({'groups': {'full': empty}, 'all': empty}).splitlines()[2]
    assert 'nan' not in row and row.split()[3:6] == ['-', '-', '-']


def test_evaluate_end_to_end_with_untrained_network(tmp_path):
    """Three tiny views through the full evaluate(): it must finish and write its outputs."""
    from xray_ct_reg import ct, model
    patient = ct.load_patient('example')
    network = model.SCRNet(base_width=4, depth=2)
    network.set_normalisation(patient.bone_centroid, patient.bone_radius)
    checkpoint = model.save_checkpoint(tmp_path / 'untrained.pt', network,
                                       {'ct_sha256': patient.ct_sha256, 'image_size': [64, 64]})
    report = evaluate.evaluate(checkpoint, patient, n_per_group=1, out_dir=tmp_path / 'out',
                               progress=False)
    assert [r['group'] for r in report['records']] == list(evaluate.GROUPS)
    assert report['size'] == 64 and report['seed'] == evaluate.DEFAULT_SEED
    data = json.loads((tmp_path / 'out' / 'evaluation.json').read_text())
    assert set(data['groups']) == set(evaluate.GROUPS)
    assert (tmp_path / 'out' / 'evaluation.png').is_file()
    for record in report['records']:  # an untrained network is rejected, or its error counted
        assert not record['accepted'] or np.isfinite(record['mtre_mm'])
