"""One adapter per modality; :func:`get_adapter` picks it by the recipe's ``modality``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.modalities.base import Adapter
    from evomerge.recipe import SDXLSpec


def get_adapter(modality: str, *, grouping: str = "blocks", trust_remote_code: bool = False,
                sdxl: SDXLSpec | None = None) -> Adapter:
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
