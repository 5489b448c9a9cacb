"""Pipeline configs shipped with enginekit: one diffusers ``save_pretrained`` layout per
published architecture (built with seeded weights by ``--random-weights``) and per tiny twin.

Where the values come from:

``sd3-medium``
    stabilityai/stable-diffusion-3-medium-diffusers' model_index.json and component configs.
``sd35-medium``, ``sd35-large``
    stabilityai/stable-diffusion-3.5-medium / -large: the text encoders (CLIP-L, CLIP-G,
    T5-XXL v1.1), tokenizers and the 16-channel VAE (scaling 1.5305, shift 0.0609) are
    SD3 Medium's, unchanged. The transformers are the published transformer/config.json
    values, as diffusers' scripts/convert_sd3_to_diffusers.py derives them from the
    original checkpoints (qk_norm "rms_norm" when ``ln_q`` weights exist; dual-attention
    (MMDiT-X) layers where ``attn2`` weights exist): Medium 24 layers x 24 heads of 64,
    caption_projection_dim 1536, pos_embed_max_size 384, dual_attention_layers 0..12;
    Large 38 layers x 38 heads, caption_projection_dim 2432, pos_embed_max_size 192, no
    dual-attention layers. The same numbers appear in third-party mirrors of those configs.
``flux-dev``, ``flux-schnell``
    black-forest-labs/FLUX.1-dev / FLUX.1-schnell: transformer 19 double + 38 single blocks,
    24 heads of 128, joint_attention_dim 4096, pooled_projection_dim 768, axes_dims_rope
    (16, 56, 56); guidance_embeds true for dev, false for schnell. CLIP-L (CLIPTextModel) and
    T5-XXL v1.1; the VAE's scaling 0.3611, shift 0.1159 (BFL's ae_params). Schedulers: dev's
    resolution-dependent shift (use_dynamic_shifting, base 0.5, max 1.15), schnell's fixed
    shift 1.0. Diffusers' FluxPipeline defaults max_sequence_length to 512; schnell's model
    card (and its timestep-distillation) uses 256 tokens, 4 steps and guidance 0.
``tiny-*``
    seeded twins with the real component structure at unit-test size (``tiny-sd35``: SD3's
    tiny twin with one dual-attention layer and rms_norm q/k norms).
"""
