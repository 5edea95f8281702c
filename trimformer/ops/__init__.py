"""Functional ops: Triton kernels, their PyTorch paths and their ``naive.py`` references. No nn.Module here."""
