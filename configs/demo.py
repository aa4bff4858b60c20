# A small InternLM that trains on any 2-core CPU in minutes (`make demo`), on the demo corpus that
# `make demo` prepares (byte-level tokens of Python's standard library). Same format as configs/7B_sft.py.
# Sized for the slower machine class: a CPU without native bf16 trains it in fp32 (dtype "auto"),
# where 400 steps of 1,024 tokens take about 3 minutes; a CPU with AMX / AVX512-BF16 trains in bf16.
import os

JOB_NAME = "demo"

SEQ_LEN = 512
HIDDEN_SIZE = 256
NUM_ATTENTION_HEAD = 4
MLP_RATIO = 8 / 3
NUM_LAYER = 4
VOCAB_SIZE = 384  # the byte tokenizer's 259 ids, padded to a multiple of 128

CHECKPOINT_EVERY = 100
SAVE_CKPT_FOLDER = "local:runs/demo/ckpt"
ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    checkpoint_every=CHECKPOINT_EVERY,
    oss_snapshot_freq=CHECKPOINT_EVERY // 2,
    # Training waits only for the copy into memory; a private ckpt-uploader writes the folder.
    # One spool per user: the uploader refuses a spool another user owns.
    async_upload=True,
    async_upload_tmp_folder=f"/dev/shm/llm-pretrain-demo-{os.getuid()}/"
    if os.path.isdir("/dev/shm")
    else "runs/demo/spool/",
    # `make demo` again continues from the newest complete checkpoint (or does nothing when done).
    auto_resume=True,
)

# Every step also goes to MLflow (a SQLite store in the project folder; `make mlflow-ui` serves it).
metrics = dict(mlflow_tracking_uri="sqlite:///mlruns/mlflow.db", experiment="demo")

TRAIN_FOLDER = "demo_data/packed"
data = dict(
    seq_len=SEQ_LEN,
    micro_num=1,
    micro_bsz=2,
    valid_micro_num=4,
    valid_every=50,
    pack_sample_into_one=False,
    total_steps=400,
    skip_batches="",
    rampup_batch_size="",
    min_length=0,
    train_folder=TRAIN_FOLDER,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True,
    overlap_sync_param=True,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(
    lr=2e-3,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_beta2_c=0,
    adam_eps=1e-8,
    weight_decay=0.01,
)

lr_scheduler = dict(
    total_steps=data["total_steps"],
    init_steps=0,
    warmup_ratio=0.05,
    eta_min=1e-4,
    last_epoch=-1,
)

beta2_scheduler = dict(
    init_beta2=adam["adam_beta2"],
    c=adam["adam_beta2_c"],
    cur_iter=-1,
)

model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    # bf16 where the device computes it natively, else fp32 on CPUs (fp16 + loss scaler on older GPUs);
    # the run's log says which it took and why.
    dtype="auto",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)

parallel = dict(
    zero1=1,
    pipeline=dict(size=1, interleaved_overlap=True),
    sequence_parallel=False,
)

cudnn_deterministic = False
cudnn_benchmark = False
