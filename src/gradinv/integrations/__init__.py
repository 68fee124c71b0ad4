"""Thin adapters to optional libraries (Flower, Opacus, TenSEAL), installed as extras (``gradinv[he]``...).

Each module imports its library only inside its functions: ``import gradinv`` and the core never load them.
"""
