"""Measured diffraction: instrument model, per-index peak tables and multi-phase identification.

:mod:`mmmat.xrd.instrument` (the diffractometer in torch), :mod:`mmmat.xrd.phases` (peak tables of an
index, cached beside it) and :mod:`mmmat.xrd.identify` (which phases a scan holds, and how much of each).
"""
