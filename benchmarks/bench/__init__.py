"""The benchmark behind benchmarks/bench_sampling.py, one module per concern.

    fixtures    ComfyUI import set-up, the random-weight models (UNets, Flux, SD3), cases and the
                shared sampling runner (same model, conditioning, noise and seed per variant)
    naive       the naive baselines (the time embedding computed per pixel or per token)
    measure     wall time, peak memory (in process or in a fresh one), the piece timer and the
                sampler-side pieces every family shares
    unet_rows   the UNet rows (SD1.5, SDXL shapes): variants, profile, the UNet forward alone
    dit         what the transformer families' rows share: case inputs, the forward alone
    flux_rows   the Flux rows (dev, schnell): the key-mask variant, profile, the forward alone
    mmdit_rows  the SD3 rows (SD3.5 large and medium shapes), the same way
    report      statistics and the markdown tables
    cli         the command line (benchmarks/bench_sampling.py is a thin entry to it)

Nothing here imports torch or ComfyUI at import time, so ``--render`` works without them.
"""
