#!/usr/bin/env bash
# All four stages on the built-in corpus with the tiny preset, offline, on CPU: about 2 minutes on 2 idle cores.
#   bash quickstart.sh [output folder]      (default: quickstart_out/)
set -euo pipefail
cd "$(dirname "$0")"
OUT="${1:-quickstart_out}"
PY="${PYTHON:-python3}"
TOK=(--tokenizer_path "$OUT/tokenizer")

echo "== 1/4 train a 4096-token byte-level BPE on the built-in corpus"
$PY train_tokenizer.py --dataset_path_huggingface builtin --vocab_size 4096 \
    --tokenizer_train_shard_size 3000000 --output_path "$OUT/tokenizer"

echo "== 2/4 tokenize the corpus into .npy shards"
$PY tokenize_data.py --dataset_path_huggingface builtin "${TOK[@]}" --data_file_name "$OUT/data" \
    --encoded_dataset_shard_size 100000 --overwrite

echo "== 3/4 train the tiny MLA+MoE model"
$PY train.py --model tiny "${TOK[@]}" --data_file_name "$OUT/data" --save_file_name "$OUT/checkpoints" \
    --resume=False --steps 600 --seq_len 128 --batch_size 16 --total_batch_size 2048 --lr 3e-3 --min_lr 3e-4 \
    --optimizer muon --muon_lr 0.02 --lr_schedule wsd --decay_frac 0.4 --warm_up 30 --eval_rate 200 --eval_steps 10 --save_rate 200 --log_every 20

echo "== 4/4 generate"
$PY generate.py "${TOK[@]}" --save_file_name "$OUT/checkpoints" --input_text "The function returns" \
    --num_tokens_to_generate 80 --temperature 0.8 --top_p 0.95
