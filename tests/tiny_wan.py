"""A tiny random-weight ChronoEdit (Wan 2.1 image-to-video) for tests, in the files users have.

API:
    spiece_model()   -> a tiny SentencePiece model's bytes (trained here on a few lines; pad 0, end 1, unk 2).
    hf_tokenizer()   -> transformers' T5 tokenizer built from that model's pieces and scores (the pipeline's;
                        Kiln reads the same bytes with sentencepiece itself).
    components()     -> diffusers parts keyed as ChronoEditPipeline names them (cached; do not mutate):
                        transformer (2 heads of 128, 2 blocks), vae (AutoencoderKLWan), text_encoder (UMT5),
                        tokenizer, image_encoder (CLIPVisionModel, 32 px, 16 heads), image_processor, scheduler
                        (FlowMatchEuler, shift 5: the template's ModelSamplingSD3 5 with euler).
    pipeline()       -> ChronoEditPipeline over them.
    comfy_text_state() -> UMT5 as Comfy-Org's umt5_xxl file holds it (the tokenizer as ``spiece_model``).
    original_state() -> the transformer in Wan's / ComfyUI's key layout.
    clip_vision_state() -> CLIP ViT as ComfyUI's clip_vision_h file holds it (with its projection).
    make_models_folder(root) -> ComfyUI's folders with all of them under the template's names.
"""
from __future__ import annotations

import functools
import io
from typing import Any

#: UMT5: width 32, 2 blocks (each with its relative attention bias).
TEXT = 32
#: CLIP vision: width 32, 16 heads (every CLIP tower Kiln reads has 16), 32 px pictures of 16 px patches.
VISION, PICTURE = 32, 32
#: The template's file names.
UNET, CLIP, CLIP_VISION, VAE = ("chrono_edit_14B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                "clip_vision_h.safetensors", "wan_2.1_vae.safetensors")
LINES = ("a photo of a cat on a mat", "the quick brown fox jumps over the lazy dog",
         "make the sky blue and add a red balloon", "an old man with a hat, smiling",
         "turn the cup into glass and keep the table")


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (zero-initialised norms and tables would hide inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@functools.lru_cache(maxsize=None)
def spiece_model() -> bytes:
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 20), model_writer=out, vocab_size=40, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="identity", minloglevel=2)
    return out.getvalue()


def hf_tokenizer() -> Any:
    """transformers' T5TokenizerFast over a ``tokenizers`` Unigram with the model's pieces and scores
    (SentencePiece's whitespace rule: runs collapsed, ends stripped, a "▁" before each word)."""
    import sentencepiece
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_model())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id()))
    tk.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", sp.eos_id())])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def vision_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=VISION, num_hidden_layers=3, num_attention_heads=16, intermediate_size=48,
                            patch_size=16, image_size=PICTURE, projection_dim=16, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def build(seed: int = 5) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan, ChronoEditTransformer3DModel, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=40, d_model=TEXT, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False))
        _perturb(text_encoder, 0.05)
        transformer = ChronoEditTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=TEXT, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, image_dim=VISION,
            added_kv_proj_dim=256, rope_max_seq_len=1024, rope_temporal_skip_len=8)
        _perturb(transformer, 0.05)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16)
        _perturb(vae, 0.02)
        vision = CLIPVisionModelWithProjection(vision_config())
        _perturb(vision, 0.02)
    for m in (text_encoder, transformer, vae, vision):
        m.eval().requires_grad_(False)
    processor = CLIPImageProcessor(size={"shortest_edge": PICTURE}, crop_size={"height": PICTURE, "width": PICTURE},
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    return {"text_encoder": text_encoder, "tokenizer": hf_tokenizer(), "transformer": transformer, "vae": vae,
            "vision_with_projection": vision, "image_processor": processor,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    """ChronoEditPipeline over the tiny parts (its image encoder the tower without its projection, as the
    pipeline reads hidden states only). Its ftfy cleaning, absent here, is the identity on the tests' prompts."""
    from diffusers.pipelines.chronoedit import pipeline_chronoedit
    from transformers import CLIPVisionModel

    from flow_family_files import quiet_pipeline

    if not hasattr(pipeline_chronoedit, "ftfy"):
        pipeline_chronoedit.ftfy = _NoFtfy()
    parts = dict(components())
    encoder = CLIPVisionModel(vision_config()).eval().requires_grad_(False)
    tower = parts.pop("vision_with_projection").state_dict()
    own = set(encoder.state_dict())  # transformers 5 names the bare tower's weights without vision_model.
    encoder.load_state_dict({k.removeprefix("vision_model.") if k.removeprefix("vision_model.") in own else k: v
                             for k, v in tower.items() if k != "visual_projection.weight"})
    return quiet_pipeline("ChronoEditPipeline", {**parts, "image_encoder": encoder})


class _NoFtfy:
    @staticmethod
    def fix_text(text: str) -> str:
        return text


def original_state() -> dict:
    from nodes.checkpoint.wan_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()["transformer"].state_dict()).items()}


def clip_vision_state() -> dict:
    return {k: v.contiguous() for k, v in components()["vision_with_projection"].state_dict().items()}


def make_models_folder(root: Any) -> Any:
    """ComfyUI's folders with the tiny ChronoEdit under the template's names: diffusion_models/ (Wan's
    layout), text_encoders/ (UMT5 with its tokenizer), clip_vision/, vae/ (Wan's layout)."""
    from pathlib import Path

    from flow_family_files import save_state
    from nodes.checkpoint.qwen_image_vae import to_original

    root = Path(root)
    save_state(root / "diffusion_models" / UNET, original_state())
    save_state(root / "text_encoders" / CLIP, comfy_text_state())
    save_state(root / "clip_vision" / CLIP_VISION, clip_vision_state())
    save_state(root / "vae" / VAE, to_original(components()["vae"].state_dict()))
    return root


def comfy_text_state() -> dict:
    """Comfy-Org's umt5_xxl layout: transformers' UMT5 encoder names, ``spiece_model`` beside them."""
    import torch

    state = {k: v.contiguous() for k, v in components()["text_encoder"].state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    state["spiece_model"] = torch.frombuffer(bytearray(spiece_model()), dtype=torch.uint8)
    return state
