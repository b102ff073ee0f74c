"""Compile options passed to every kernel launch (no triton import: the torch-only launch modules use it too)."""

# FMA contraction on (Triton's default), said explicitly: from Triton 3.9 an unset TRITON_DEFAULT_FP_FUSION makes
# every compile warn that the default will change.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
