"""The benchmark behind benchmarks/bench_sampling.py, one module per concern.

    fixtures    ComfyUI import set-up, the random-weight models (UNets, Flux, SD3), cases and the
                shared sampling runner (same model, conditioning, noise and seed per variant)
    naive       the naive baselines (the time embedding computed per pixel or per token)
    measure     wall time, peak memory (in process or in a fresh one), the piece timer and the
                sampler-side pieces every family shares
    unet_rows   the UNet rows (SD1.5, SDXL shapes): variants, profile, the UNet forward alone
    dit         the transformer rows' shared runner: the case's inputs, the profile, the forward alone
    flux_rows   the Flux rows (dev, schnell): the key-mask variant, hook pieces, the forward alone
    mmdit_rows  the SD3 rows (SD3.5 large and medium shapes), the same way
    dit_models  the other transformer families' models, conditioning and latents (Flux Kontext,
                Flux.2, Chroma, Chroma Radiance, HunyuanImage 2.1, Qwen-Image(-Edit), Lumina 2,
                Z-Image, HiDream, AuraFlow) at a bench size and the tests' tiny one
    family_rows their rows: no key items and a half-image key mask vs the KSampler
    report      statistics and the markdown tables
    cli         the command line (benchmarks/bench_sampling.py is a thin entry to it)

Nothing here imports torch or ComfyUI at import time, so ``--render`` works without them.
"""
