"""Tests of kvtc-store (a package so helpers import as ``tests.<module>``)."""
