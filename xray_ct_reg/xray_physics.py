"""X-ray physics from a CT: material path lengths, tube spectra and attenuation (xraydb).

Building blocks for X-ray appearance that follows the physics rather than one fixed contrast
curve: a CT voxel is split into water-equivalent soft tissue and bone mineral
(hydroxyapatite), a :class:`MaterialProjector` integrates both along every ray in one pass,
and :func:`polyenergetic_intensity` attenuates a tube spectrum through them (and through
metal or a table when given). Attenuation coefficients come from ``xraydb`` (NIST/Elam
tables), never typed in; the tube spectrum is Kramers' law hardened by aluminium filtration.
"""
from functools import lru_cache

import numpy as np

from xray_ct_reg import drr

ENERGIES_KEV = np.arange(20.0, 151.0, 5.0)       # energy bins of the spectra (keV)
HYDROXYAPATITE = 'Ca10(PO4)6(OH)2'             # bone mineral
HA_DENSITY = 3.16                              # g/cm^3 of pure hydroxyapatite
SOFT_TISSUE_TOP_HU = 100.0                     # above: soft tissue plus bone mineral
HU_PER_HA_DENSITY = 1500.0                     # HU added per g/cm^3 of mineral (about 70 keV)
MATERIALS = {                                  # name -> (xraydb formula or name, density)
    'water': ('water', 1.0),
    'bone_mineral': (HYDROXYAPATITE, HA_DENSITY),
    'aluminium': ('aluminum', 2.699),
    'copper': ('Cu', 8.96),
    'titanium': ('titanium', 4.506),
    'steel': ('Fe0.70Cr0.19Ni0.11', 7.9),
    'iodine': ('I', 4.93),
    'carbon_fibre': ('C', 1.6),
}


@lru_cache(maxsize=64)
def _mu_per_mm(material, energies_kev):
    """Cached linear attenuation (1/mm) at full density of ``material`` at the energies."""
    import xraydb
    formula, density = MATERIALS[material]
    energies_ev = np.asarray(energies_kev, dtype=float) * 1e3
    return xraydb.material_mu(formula, energies_ev, density=density) / 10.0  # 1/cm -> 1/mm


def mu_per_mm(material, energies_kev=ENERGIES_KEV):
    """Linear attenuation (1/mm) of ``material`` (a key of MATERIALS) at full density."""
    return _mu_per_mm(material, tuple(float(e) for e in np.atleast_1d(energies_kev)))


def tube_spectrum(kvp, filtration_mm_al, energies_kev=ENERGIES_KEV):
    """Photon spectrum (sums to 1) of a tube at ``kvp`` behind ``filtration_mm_al`` of Al.

    Kramers' law for the thick-target bremsstrahlung photon count, (kVp - E) / E, hardened by
    the filtration's attenuation.
    """
    energies = np.asarray(energies_kev, dtype=float)
    counts = np.clip(kvp - energies, 0.0, None) / energies
    counts = counts * np.exp(-mu_per_mm('aluminium', energies) * filtration_mm_al)
    total = counts.sum()
    if total <= 0:
        raise ValueError(f'no photons below {kvp} kVp in {energies.min()}-{energies.max()} keV')
    return counts / total


def material_densities(hu):
    """(2, ...) water-equivalent soft tissue density and bone mineral density from HU.

    Soft tissue (relative density 1 + HU/1000, capped at 1.1) fills every voxel; above
    SOFT_TISSUE_TOP_HU the excess is hydroxyapatite at 1/HU_PER_HA_DENSITY g/cm^3 per HU,
    as a fraction of its full density.
    """
    hu = np.asarray(hu, dtype=np.float32)
    soft = np.clip(1.0 + np.minimum(hu, SOFT_TISSUE_TOP_HU) / 1000.0, 0.0, None)
    mineral = np.clip(hu - SOFT_TISSUE_TOP_HU, 0.0, None) / HU_PER_HA_DENSITY / HA_DENSITY
    return np.stack([soft, mineral])


class MaterialProjector(drr.DRRProjector):
    """Path lengths (mm at full density) of soft tissue and bone mineral along every ray."""

    def __init__(self, ct, voxel_mm=2.0, step_mm=None):
        """Resample ``ct`` (HU) and split it into the two materials."""
        super().__init__(ct, voxel_mm=voxel_mm, step_mm=step_mm, channels=material_densities)


def polyenergetic_intensity(path_mm, spectrum, energies_kev=ENERGIES_KEV):
    """Detected primary intensity (fraction of the unattenuated beam) behind the materials.

    ``path_mm`` maps material names (keys of MATERIALS) to path-length images (mm at full
    density, same shape); ``spectrum`` weighs the energy bins. Beer-Lambert per energy, summed
    over the spectrum weighted by energy (an energy-integrating detector).
    """
    energies = np.asarray(energies_kev, dtype=float)
    weights = np.asarray(spectrum, dtype=float) * energies
    weights = weights / weights.sum()
    shape = np.shape(next(iter(path_mm.values())))
    exponent = np.zeros((len(energies),) + shape)
    for material, path in path_mm.items():
        exponent += mu_per_mm(material, energies)[:, None, None] * np.asarray(path)[None]
    return np.tensordot(weights, np.exp(-exponent), axes=1)
