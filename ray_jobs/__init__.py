"""Fleet jobs on Ray: calibration across workers, codec registry, re-encode, GC.

Not built yet; the single-process calibration job is :mod:`kvtc_store.calibration`.
"""
