#!/usr/bin/env bash
# Every measurement behind docs/scaling.md, on this machine (CPU, gloo). Run from the repository root with the venv
# active (or PY=.venv/bin/python). Writes JSON/PNG under OUT (default docs/results/profile) and prints the tables.
# Stages can be run alone: tools/profile_cpu.sh peak|sweep|trainer|loop|paired|validate|model
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-docs/results/profile}
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
P="$PY -m oapl_megatron.entrypoints.profiling"
stage=${1:-all}
run() { [[ $stage == all || $stage == "$1" ]]; }

# The demo's batch shape (P=32 × G=8 sequences per step; prompt ≈ 10 and response ≈ 26 ± 12 tokens of the char
# tokenizer, measured in the loop runs) on the demo's policy shape (4 layers, d=128, GQA 4/2, tied) — preset "demo".
if run peak; then
  $P peak --ranks 1 --out "$OUT/peak_r1"
  $P peak --ranks 2 --out "$OUT/peak_r2"
fi
if run sweep; then
  $P sweep --model cpu-small --ranks 4 --mbs 2 8 --seqs 16 --prompt-len 32 --response-len 96 --steps 3 \
    --fresh-process --peak-json "$OUT/peak_r2/result.json" --out "$OUT/sweep_cpu_small_r4"
fi
if run trainer; then
  $P scaling --model demo --ranks 1 2 4 --seqs-per-rank 64 --prompt-len 10 --response-len 26 --response-jitter 12 \
    --mbs 64 --steps 4 \
    --peak-json "$OUT/peak_r2/result.json" --out "$OUT/trainer_scaling_demo"
fi
if run loop; then
  # the demo's loop (its config, a freshly warm-started policy), short and without evaluation / export
  [[ -f runs/profile_demo_model/config.json ]] || $PY tools/profile_demo_model.py runs/profile_demo_model
  $P scaling --loop configs/demo.yaml --ranks 1 2 4 --out "$OUT/loop_scaling_demo" --peak-json "$OUT/peak_r2/result.json" \
    --override model.hf_path=runs/profile_demo_model parallel.tp=1 train.steps=12 eval.every=0 \
               checkpoint.save_on_exit=false logging.tensorboard=false
fi
if run paired; then
  # trainer-only and whole-loop measurement at each world size back to back, so that both see the same load
  # (on a shared machine the load drifts within minutes); validate-paired compares them
  [[ -f runs/profile_demo_model/config.json ]] || $PY tools/profile_demo_model.py runs/profile_demo_model
  for n in 1 2 4; do
    $P scaling --model demo --ranks $n --kinds strong --strong-seqs 256 --seqs-per-rank 64 --prompt-len 10 \
      --response-len 26 --response-jitter 12 --mbs 64 --steps 4 --out "$OUT/paired/trainer_n$n"
    $P scaling --loop configs/demo.yaml --ranks $n --out "$OUT/paired/loop_n$n" \
      --override model.hf_path=runs/profile_demo_model parallel.tp=1 train.steps=12 eval.every=0 \
                 checkpoint.save_on_exit=false logging.tensorboard=false
  done
  $P validate --trainer "$OUT"/paired/trainer_n{1,2,4}/scaling.json --loop "$OUT"/paired/loop_n{1,2,4}/scaling.json \
    --calibrate-on 0 --out "$OUT/validation_paired.json"
fi
if run validate; then
  $P validate --trainer "$OUT/trainer_scaling_demo/scaling.json" --loop "$OUT/loop_scaling_demo/scaling.json" \
    --out "$OUT/validation.json"
  $P validate --trainer "$OUT/trainer_scaling_demo/scaling.json" --loop "$OUT/loop_scaling_demo/scaling.json" \
    --calibrate-on 2 --out "$OUT/validation_cal2.json"
fi
if run model; then
  $P model --model qwen3-4b --gpu h100 --lag 50 --prompts 32 --samples 8 --prompt-len 512 --response-len 8192 \
    --gpus 8 16 32 64 128 256 512 1024 --out "$OUT/model_qwen3_4b_math.json"
  # 14B: the trainer needs TP4 and ≥ 8 GPUs to hold weights + grads + Adam state; TP4 engines fit long contexts
  $P model --model r1-distill-qwen-14b --gpu h100 --lag 400 --prompts 32 --samples 8 --prompt-len 4096 \
    --response-len 16000 --tp 4 --engine-tp 4 --gpus 16 32 64 128 256 512 1024 --out "$OUT/model_r1_14b_code.json"
  # peers' anchor: NeMo-RL Qwen3-32B end-to-end tokens/s per GPU at 32 and 64 GPUs
  $P model --model qwen3-32b --gpu h100 --lag 1 --prompts 32 --samples 8 --prompt-len 512 --response-len 8192 \
    --tp 8 --engine-tp 2 --gpus 32 64 --out "$OUT/model_qwen3_32b_peer.json"
  $P model --model qwen3-32b --gpu h100 --lag 50 --prompts 32 --samples 8 --prompt-len 512 --response-len 8192 \
    --tp 8 --engine-tp 2 --gpus 32 64 --out "$OUT/model_qwen3_32b_l50.json"
  # NeMo-RL Llama-8B (an 8B dense model; Qwen3-8B here) end-to-end tokens/s per GPU at 16 GPUs
  $P model --model qwen3-8b --gpu h100 --lag 1 --prompts 32 --samples 8 --prompt-len 512 --response-len 8192 \
    --tp 2 --gpus 16 --out "$OUT/model_qwen3_8b_peer.json"
  $P model --model qwen3-8b --gpu h100 --lag 50 --prompts 32 --samples 8 --prompt-len 512 --response-len 8192 \
    --tp 2 --gpus 16 --out "$OUT/model_qwen3_8b_l50.json"
fi
