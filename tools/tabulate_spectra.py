"""Tabulate unfiltered X-ray tube spectra from SpekPy into xray_ct_reg/tube_spectra.json.

SpekPy (a 164 MB wheel) is used once, here, at preparation time; the table it leaves is small and
needs nothing to read. The training appearance (``appearance.py``) interpolates between kVp rows
and adds its own filtration with xraydb attenuation. Reproduce with:

    python3 -m venv /tmp/spek && /tmp/spek/bin/pip install spekpy==2.5.4 numpy scipy
    /tmp/spek/bin/python tools/tabulate_spectra.py
"""
import json
from pathlib import Path

import numpy as np
import spekpy

ENERGIES_KEV = np.arange(20.0, 151.0, 5.0)   # bin centres, as xray_physics.ENERGIES_KEV
KVPS = np.arange(50.0, 131.0, 10.0)
ANODE_ANGLE_DEG = 12.0                        # a typical C-arm tungsten anode


def binned_spectrum(kvp):
    """Photon fluence per 5 keV bin (sums to 1) of a tungsten tube at ``kvp``, no filtration."""
    spectrum = spekpy.Spek(kvp=float(kvp), th=ANODE_ANGLE_DEG, dk=1.0)
    energies, fluence = spectrum.get_spectrum()
    bins = np.zeros(len(ENERGIES_KEV))
    for energy, value in zip(energies, fluence, strict=True):
        index = int(np.argmin(np.abs(ENERGIES_KEV - energy)))
        if abs(ENERGIES_KEV[index] - energy) <= 2.5:
            bins[index] += value
    return bins / bins.sum()


def main():
    """Write the table next to the package's modules."""
    table = {'source': f'spekpy {spekpy.__version__}, tungsten anode {ANODE_ANGLE_DEG} deg, '
                       'no added filtration, 1 keV steps summed into 5 keV bins',
             'energies_kev': ENERGIES_KEV.tolist(), 'kvp': KVPS.tolist(),
             'fluence': [np.round(binned_spectrum(kvp), 6).tolist() for kvp in KVPS]}
    path = Path(__file__).resolve().parent.parent / 'xray_ct_reg' / 'tube_spectra.json'
    path.write_text(json.dumps(table, indent=1) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
