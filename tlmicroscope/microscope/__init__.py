"""LLM-Microscope (Razzhigaev et al.): linearity, token-wise non-linearity, layer contributions,
contextualization by prefix decoding, token classes, anisotropy and filler-token removal."""

__all__: list[str] = []
