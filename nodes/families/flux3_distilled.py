"""FLUX.3 [klein] step-distilled: the base model's network as a flow map, sampled in 16 steps at cfg 1.

Everything the base family does (nodes.families.flux3: FLUX.2's latents, Qwen3-VL text padded to
multiples of 80, the 0.5-scaled rotary ids, the constant shift of 6.93, references on the l axis)
holds; what differs lives in the weights and in one network input:

* **Flow map.** The transformer has a second timestep embedder (BFL's ``ref_time_in``, diffusers'
  ``target_timestep_embedder``) and reads, besides the step's noise level, the level the step jumps to
  (the pipeline's next timestep, 0 at the last step). The denoiser hands it that level from the
  sampler's own sigmas (``WrappedTransformer.reads_next_sigma``: nodes.samplers.schedules.next_sigma),
  so KSampler, SamplerCustom and SamplerCustomAdvanced all give it alike.
* **Guidance.** None: Flux3DistilledModularPipeline runs no classifier-free guidance, KSampler's cfg 1
  (ComfyUI's distilled template); a negative is then never evaluated.
"""
from __future__ import annotations

from nodes.families import flux3
from nodes.families.base import Shapes


class Flux3Distilled(flux3.Flux3):
    name = "flux3_distilled"

    def claims_unet(self, shapes: Shapes) -> bool:
        """FLUX.3's keys with the flow-map embedder, in either layout."""
        from nodes.checkpoint import flux3_keys

        return (flux3_keys.is_original(shapes) or flux3_keys.is_diffusers(shapes)) and flux3_keys.is_distilled(shapes)


FAMILY = Flux3Distilled()
