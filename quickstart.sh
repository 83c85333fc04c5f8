#!/usr/bin/env bash
# Every stage on the built-in corpus with the tiny preset, offline, on CPU: pretrain, fine-tune to chat, talk.
#   bash quickstart.sh [output folder]      (default: quickstart_out/)
set -euo pipefail
cd "$(dirname "$0")"
OUT="${1:-quickstart_out}"
PY="${PYTHON:-python3}"
TOK=(--tokenizer_path "$OUT/tokenizer")

echo "== 1/6 train a 4096-token byte-level BPE on the built-in corpus"
$PY train_tokenizer.py --dataset_path_huggingface builtin --vocab_size 4096 --overwrite \
    --tokenizer_train_shard_size 3000000 --output_path "$OUT/tokenizer"

echo "== 2/6 tokenize the corpus into .npy shards"
$PY tokenize_data.py --dataset_path_huggingface builtin "${TOK[@]}" --data_file_name "$OUT/data" \
    --encoded_dataset_shard_size 100000 --overwrite

echo "== 3/6 train the tiny MLA+MoE model"
$PY train.py --model tiny "${TOK[@]}" --data_file_name "$OUT/data" --save_file_name "$OUT/checkpoints" \
    --resume=False --overwrite --steps 600 --seq_len 128 --batch_size 16 --total_batch_size 2048 --lr 6e-3 \
    --min_lr 6e-4 --embed_lr 0.015 --optimizer muon --muon_lr 0.01 --lr_schedule wsd --decay_frac 0.4 --warm_up 30 \
    --eval_rate 200 --eval_steps 10 --save_rate 200 --log_every 20

echo "== 4/6 generate"
$PY generate.py "${TOK[@]}" --save_file_name "$OUT/checkpoints" --input_text "The function returns" \
    --num_tokens_to_generate 80 --temperature 0.8 --top_p 0.95

echo "== 5/6 supervised fine-tuning on the built-in instruction set (questions about Python, answered by its docs)"
$PY sft.py --init_from "$OUT/checkpoints" --save_file_name "$OUT/sft_checkpoints" --resume=False --overwrite \
    --steps 150 --seq_len 256 --batch_size 16 --total_batch_size 4096 --lr 1e-3 --min_lr 1e-4 --warm_up 10 \
    --eval_rate 50 --eval_steps 4 --save_rate 150 --log_every 25

echo "== 6/6 chat (held-out question; interactive: python generate.py --chat --save_file_name $OUT/sft_checkpoints)"
printf '%s\n' 'What is `base64.encode` for?' | $PY generate.py --chat --save_file_name "$OUT/sft_checkpoints" \
    --temperature 0 --num_tokens_to_generate 80
