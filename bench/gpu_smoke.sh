#!/usr/bin/env bash
# The CUDA paths CI cannot run (it has no GPU), in one short script for a GPU machine: bf16/fp16 autocast training
# against fp32, fused AdamW, torch.compile (inductor), an NCCL process group with DDP, flash SDPA, Muon, FSDP2 with a
# bf16 mixed-precision policy, SFT, and generation. Prints one PASS/FAIL line per check; exits non-zero on a FAIL.
#   bash bench/gpu_smoke.sh [work folder]
#   ONLY="tokenizer tokenize fsdp_1gpu" bash bench/gpu_smoke.sh      # a subset (a check needs the ones it reads)
set -uo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/gpu_smoke}"
PY="${PYTHON:-python3}"
rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
FAILS=0
check() {  # check NAME COMMAND...: run, keep the log, print PASS/FAIL with the last line
    local name=$1; shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi   # ONLY="a b": run just those
    local t0=$SECONDS
    if "$@" >"$W/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - t0)) s): $(tail -n 1 "$W/$name.log" | cut -c1-200)"
    else
        echo "FAIL $name ($((SECONDS - t0)) s):"; tail -n 15 "$W/$name.log"; FAILS=$((FAILS + 1))
    fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

TOK=(--tokenizer_path "$W/tok"); DATA=(--data_file_name "$W/data")
check tokenizer $PY train_tokenizer.py --vocab_size 4096 --tokenizer_train_shard_size 3000000 --output_path "$W/tok"
check tokenize $PY tokenize_data.py "${TOK[@]}" "${DATA[@]}" --encoded_dataset_shard_size 200000

BASE=(--model small-moe "${TOK[@]}" "${DATA[@]}" --steps 30 --seq_len 256 --batch_size 16 --total_batch_size 8192
      --lr 3e-3 --warm_up 5 --eval_rate 30 --eval_steps 4 --save_rate 30 --log_every 10 --device cuda)
check train_fp32 $PY train.py "${BASE[@]}" --dtype fp32 --save_file_name "$W/fp32"
check train_bf16 $PY train.py "${BASE[@]}" --dtype bf16 --save_file_name "$W/bf16"
check train_fp16 $PY train.py "${BASE[@]}" --dtype fp16 --save_file_name "$W/fp16"
check train_compile $PY train.py "${BASE[@]}" --dtype bf16 --compile_model --save_file_name "$W/compiled"
check train_muon $PY train.py "${BASE[@]}" --dtype bf16 --optimizer muon --save_file_name "$W/muon"
# the losses of the bf16/fp16/compiled runs track fp32 (last logged step)
check compare_losses $PY - "$W" <<'EOF'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
def last(run):
    recs = [json.loads(l) for l in (w / run / "log.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    return train[-1]["loss"], [r for r in recs if r["kind"] == "eval"][-1]
ref, ref_eval = last("fp32")
for run in ("bf16", "fp16", "compiled"):
    loss, ev = last(run)
    print(run, f"loss {loss:.4f} vs fp32 {ref:.4f}", ev)
    assert abs(loss - ref) < 0.05 * ref, run
print("ok: bf16/fp16/compiled within 5% of fp32 after 30 steps;", "fp32 eval", ref_eval)
EOF
check fused_adamw $PY -c "
import torch, sys; sys.argv = ['x']
from config import TrainConfig, model_args_from_preset
from optim import build_optimizer
from model import Transformer
with torch.device('cuda'): m = Transformer(model_args_from_preset('tiny', vocab_size=512))
m.init_weights()
opt = build_optimizer(m, TrainConfig(), torch.device('cuda'))
print('fused' , [g.get('fused') for g in opt.param_groups] if hasattr(opt, 'param_groups') else opt)
"
# NCCL: a one-rank process group on the GPU, DDP-wrapped training steps through the core's collectives
check nccl_ddp $PY - "${TOK[@]}" "${DATA[@]}" <<'EOF'
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
t = torch.ones(4, device=dev); dist.all_reduce(t); assert t.sum().item() == 4
from torch.nn.parallel import DistributedDataParallel as DDP
from config import model_args_from_preset
from model import Transformer
with torch.device(dev): m = Transformer(model_args_from_preset("tiny", vocab_size=512))
m.init_weights()
ddp = DDP(m, device_ids=[0], broadcast_buffers=False)
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, fused=True)
x = torch.randint(0, 512, (4, 64), device=dev)
for _ in range(3):
    with torch.autocast("cuda", torch.bfloat16):
        loss = ddp(x, x)
    loss.backward(); opt.step(); opt.zero_grad()
dist.destroy_process_group()
print("ok: nccl all_reduce + DDP bf16 steps, loss", loss.item())
EOF
check flash_sdpa $PY - <<'EOF'
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from config import model_args_from_preset
from model import Transformer
torch.manual_seed(0)
for attn in ("mla", "mha"):
    with torch.device("cuda"):
        m = Transformer(model_args_from_preset("small-moe", vocab_size=512, attn_type=attn)).to(torch.bfloat16)
    m.init_weights(); m.to(torch.bfloat16)
    x = torch.randint(0, 512, (2, 256), device="cuda")
    with torch.no_grad():
        # the bf16 math kernel's own rounding is the yardstick: a fused kernel may differ from the fp32 result by
        # as much as bf16 math does, not more
        with torch.device("cuda"):
            exact = Transformer(model_args_from_preset("small-moe", vocab_size=512, attn_type=attn))
        exact.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        with sdpa_kernel(SDPBackend.MATH):
            fp32 = exact(x)
            ref = m(x).float()
        ref_err = (ref - fp32).abs().max().item()
        used = None
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    out = m(x).float()
                used = backend; break
            except RuntimeError as e:
                print(attn, backend, "not usable:", str(e).splitlines()[0][:120])
    err = (out - fp32).abs().max().item()
    print(attn, "fused kernel", used, f"max |diff| vs fp32 {err:.4f}; bf16 math kernel vs fp32 {ref_err:.4f}")
    assert used is not None and err <= 1.5 * ref_err + 0.02
print("ok")
EOF
check generate $PY generate.py "${TOK[@]}" --save_file_name "$W/bf16" --input_text "The function returns" \
    --num_tokens_to_generate 64 --temperature 0 --device cuda --dtype bf16
check generate_compiled $PY generate.py "${TOK[@]}" --save_file_name "$W/bf16" --input_text "The function returns" \
    --num_tokens_to_generate 64 --temperature 0 --device cuda --dtype bf16 --compile_model
check fsdp_1gpu $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${BASE[@]}" --dtype bf16 \
    --parallel fsdp --optimizer adamw --save_file_name "$W/fsdp"
check sft $PY sft.py --init_from "$W/bf16" --save_file_name "$W/sft" --steps 20 --device cuda --dtype bf16 \
    --seq_len 256 --batch_size 8 --total_batch_size 2048 --eval_rate 20
echo "fails: $FAILS"
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_smoke_logs.tgz" -C "$W" $(cd "$W" && ls *.log)
exit $FAILS
