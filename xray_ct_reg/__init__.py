"""xray_ct_reg: X-ray to CT rigid registration by scene coordinate regression."""

__version__ = '0.1.0'
