"""One adapter per modality; :func:`get_adapter` picks it by the recipe's ``modality``."""

from __future__ import annotations

from evomerge.errors import EvomergeError


def get_adapter(modality: str, *, grouping: str = "blocks", trust_remote_code: bool = False,
                sdxl: object = None):
    if modality == "causal_lm":
        from evomerge.modalities.causal_lm import CausalLMAdapter

        return CausalLMAdapter(trust_remote_code=trust_remote_code)
    if modality == "vlm":
        from evomerge.modalities.vlm import VLMAdapter

        return VLMAdapter(trust_remote_code=trust_remote_code)
    if modality == "sdxl":
        from evomerge.modalities.sdxl import SDXLAdapter

        return SDXLAdapter(grouping=grouping, spec=sdxl)
    raise EvomergeError(f"modality {modality!r}: use causal_lm, vlm or sdxl")
