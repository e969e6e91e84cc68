#!/usr/bin/env bash
# The benchmark runs behind benchmarks/results.md, in order (about 70 min on one core of the 2-core
# CI machine). Raw results go to benchmarks/out/*.json; the tables are rendered into results-tables.md.
# Run `bash scripts/setup.sh` first. Pass run names (A B C D E F G H I J K) to run only some.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.dev/venv/bin/python
OUT=benchmarks/out
mkdir -p "$OUT"
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(A B C D E F G H I J K L)
bench() { "$PY" benchmarks/bench_sampling.py --out '' "$@"; }
for run in "${runs[@]}"; do
  case "$run" in
    # A: reduced model (the hard case: a 10M UNet, 45x cheaper per step than SD1.5): size, batch, steps axes
    A) bench --model reduced --cases 32x32:1:10,32x32:1:30,32x32:4:10,64x64:1:10 --repeats 5 --warmup 1 \
         --json "$OUT/A_reduced.json" ;;
    # B: reduced model at 128x128 (about 8 s per forward: 2 steps)
    B) bench --model reduced --cases 128x128:1:2 --repeats 5 --warmup 1 --variants ksampler,dynamic,fixed \
         --memory-steps 1 --json "$OUT/B_reduced_128.json" ;;
    # C: full-size SD1.5 UNet (860M), 32x32, 2 steps, with peak memory
    C) bench --model full --cases 32x32:1:2 --repeats 5 --warmup 1 --memory-steps 1 --json "$OUT/C_full_32.json" ;;
    # D: full-size SD1.5 UNet at 64x64, 1 step
    D) bench --model full --cases 64x64:1:1 --repeats 5 --warmup 1 --variants ksampler,dynamic,fixed --memory off \
         --no-profile --json "$OUT/D_full_64.json" ;;
    # E: SDXL-shaped UNet (SDXL's channels, context 2048, label_emb; depth 2 at /4: 899M), 32x32, 2 steps
    E) bench --model sdxl --sdxl-depth 2 --cases 32x32:1:2 --repeats 5 --warmup 1 --variants ksampler,dynamic,fixed \
         --memory off --json "$OUT/E_sdxl_32.json" ;;
    # F: the UNet forward alone with and without the pack's hooks (reduced model), 15 interleaved repeats
    F) bench --model reduced --cases 32x32:1:2,64x64:1:2,32x32:4:2 --repeats 0 --warmup 0 --no-profile \
         --memory off --unet-repeats 15 --json "$OUT/F_unet.json" ;;
    # G: Flux dev (ComfyUI's Flux class: hidden 512 in 4 heads of 128, 2 double + 4 single blocks, guidance
    #    embedding), 64x64 latent (1024 image tokens) + 128 text tokens, cfg 1, 10 steps; the forward alone too
    G) bench --model flux-dev --flux-hidden 512 --flux-double 2 --flux-single 4 --text-tokens 128 \
         --cases 64x64:1:10 --repeats 5 --warmup 1 --forward-repeats 15 --json "$OUT/G_flux_dev.json" ;;
    # H: Flux schnell (the same without the guidance embedding), 4 steps as schnell is used
    H) bench --model flux-schnell --flux-hidden 512 --flux-double 2 --flux-single 4 --text-tokens 128 \
         --cases 64x64:1:4 --repeats 5 --warmup 1 --forward-repeats 15 --json "$OUT/H_flux_schnell.json" ;;
    # I: SD3.5 large and medium shapes (ComfyUI's SD3 config, shift 3, and MMDiT class: 6 joint blocks, hidden 384
    #    in 6 heads of 64, RMS q/k norm; medium with image self-attention in blocks 0-2), 64x64 latent + 128 text
    #    tokens, cfg 4.5 (two rows per call), 10 steps; the forward alone too
    I) bench --model sd3.5-large,sd3.5-medium --sd3-depth 6 --text-tokens 128 --cases 64x64:1:10 --repeats 5 \
         --warmup 1 --forward-repeats 11 --json "$OUT/I_sd3.json" ;;
    # L: issue 18 (GPU readiness): the CPU targets after it, with ops and host syncs per step: the reduced model at
    #    32x32 (10 steps) and the SDXL-shaped UNet at 32x32 (2 steps), KSampler, dynamic key words, fixed masks; each
    #    profile piece the median of 7 (3) instrumented runs per variant, taken in turn
    L) bench --model reduced --cases 32x32:1:10 --repeats 5 --warmup 1 --variants ksampler,dynamic,fixed --memory off \
         --profile-runs 7 \
         --json "$OUT/L_reduced_32.json"
       bench --model sdxl --sdxl-depth 2 --cases 32x32:1:2 --repeats 5 --warmup 1 --variants ksampler,dynamic,fixed \
         --memory off --profile-runs 3 --json "$OUT/L_sdxl_32.json" ;;
    # J: the other transformer families (Flux Kontext, Flux.2, Chroma, Chroma Radiance, HunyuanImage 2.1, Qwen-Image,
    #    Qwen-Image-Edit, Lumina 2, Z-Image, HiDream, AuraFlow): hidden 512 in 4 heads of 128, 2-4 blocks, each at its
    #    own latent and cfg, 8 steps; no key items and a half-image key mask vs the KSampler (about 8 min)
    J) bench --families all --repeats 3 --warmup 1 --memory inprocess --no-profile --json "$OUT/J_dit_families.json" ;;
    # K: other samplers (issue 17): an SDE sampler (dpmpp_2m_sde, Brownian tree) and a multistep one with a
    #    corrector (uni_pc), on the reduced UNet at 64x64, 10 steps; the key pixels' tracks run in lock step
    K) for sampler in dpmpp_2m_sde uni_pc; do
         bench --model reduced --cases 64x64:1:10 --repeats 5 --warmup 1 --sampler "$sampler" --memory inprocess \
           --no-profile --json "$OUT/K_$sampler.json"
       done ;;
    *) echo "unknown run $run (use A-K)" >&2; exit 2 ;;
  esac
done
"$PY" benchmarks/bench_sampling.py --render "$OUT"/*.json --out benchmarks/results-tables.md
