"""Triton kernels of hyperkern (installed as ``hyperkern.kernels``).

Importing this package never imports Triton; each kernel module does, and only the Triton
backend imports those modules.
"""
