"""The norm class a layer builds, chosen in one place for every model file: megatron's local
LayerNorm / RMSNorm (apex-fused when apex is present, torch otherwise).

Its own module so that the layer files (``encoder``) and the specs that assemble them
(``specs``) both import it without importing each other.
"""

from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider


def layer_norm_class(normalization: str) -> type:
    """megatron's local norm implementation for ``model.normalization`` (``RMSNorm`` or
    ``LayerNorm``)."""
    return LocalSpecProvider().layer_norm(rms_norm=normalization == "RMSNorm", for_qk=False)
