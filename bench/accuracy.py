"""Accuracy of the committed model on held-out simulated views.

SCR only, and with intensity refinement (the node's default) on the first views of the same
test set. Views are simulated at --size px (default 128, twice the network's input, as a
detector image is larger than the network input). Prints the tables and writes
bench/results/accuracy.json. SCR-only medians move by several mm between 20-view samples, so the
defaults are 60 views per group (20 refined); about 4 minutes on 2 cores.

    .venv/bin/python bench/accuracy.py [--model models/chest_example.pt] [-n 60] [--refine-n 20]
"""
import argparse
import json
from pathlib import Path
import sys

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xray_ct_reg import ct, evaluate  # noqa: E402
from xray_ct_reg.register import to_jsonable  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default=str(REPO / 'models' / 'chest_example.pt'))
    parser.add_argument('-n', '--n-per-group', type=int, default=60)
    parser.add_argument('--size', type=int, default=128, help='simulated image size (px)')
    parser.add_argument('--refine-n', type=int, default=20,
                        help='views per group with intensity refinement (0: skip)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    out = Path(args.out)
    patient = ct.load_patient('example')
    results = {}
    runs = [('scr', args.n_per_group, False), ('scr+refine', args.refine_n, True)]
    for name, n, refine in runs:
        if n <= 0:
            continue
        report = evaluate.evaluate(args.model, patient, n_per_group=n, intensity_refine=refine,
                                   size=args.size,
                                   out_dir=out / f'accuracy_{name.replace("+", "_")}')
        print(f'\n== {name}: {n} views per group, seed {report["seed"]}, '
              f'{report["size"]} px ==')
        print(evaluate.format_table(report))
        results[name] = {key: report[key] for key in
                         ('checkpoint', 'seed', 'size', 'n_per_group', 'intensity_refine',
                          'groups', 'all')}
    path = out / 'accuracy.json'
    path.write_text(json.dumps(to_jsonable(results), indent=1))
    print(f'\nwritten {path}')


if __name__ == '__main__':
    main()
