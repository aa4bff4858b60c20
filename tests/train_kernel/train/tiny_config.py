"""A tiny InternLM config in the published format, for tests that train for real."""

from __future__ import annotations

TEMPLATE = """
JOB_NAME = "tiny"
data = dict(seq_len={seq_len}, micro_num={micro_num}, micro_bsz={micro_bsz}, total_steps={total_steps},
            valid_every={valid_every}, train_folder={train_folder!r})
adam = dict(lr={lr}, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.0)
lr_scheduler = dict(total_steps=data["total_steps"], warmup_ratio={warmup_ratio}, eta_min={lr})
hybrid_zero_optimizer = dict(clip_grad_norm={clip})
# Both overlaps on, as InternLM's configs set them (its defaults are off); a test's own value stays.
hybrid_zero_optimizer.setdefault("overlap_sync_grad", True)
hybrid_zero_optimizer.setdefault("overlap_sync_param", True)
grad_scaler = dict(fp16=dict(initial_scale={initial_scale}, min_scale=1, growth_interval=1000),
                   hysteresis={hysteresis})
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, mlp_ratio=8 / 3, vocab_size={vocab_size},
             dtype="{dtype}", embed_grad_scale=1, checkpoint=False)
parallel = dict(zero1=1)
# auto_resume=False: these tests choose what a run starts from (InternLM's default would resume);
# snapshots half way between checkpoints unless a test says otherwise (InternLM's default: none).
ckpt = dict(enable_save_ckpt={save}, save_ckpt_folder={save_folder!r}, checkpoint_every={checkpoint_every},
            auto_resume=False, oss_snapshot_freq={oss_snapshot_freq})
run_dir = {run_dir!r}
seed = {seed}
"""


def tiny_config_text(run_dir, **overrides) -> str:
    values = dict(
        seq_len=32,
        micro_num=2,
        micro_bsz=2,
        total_steps=6,
        valid_every=0,
        train_folder=None,
        lr=1e-3,
        warmup_ratio=0.0,
        clip=1.0,
        initial_scale=2**16,
        hysteresis=2,
        vocab_size=300,
        dtype="torch.float32",
        save=False,
        save_folder=f"local:{run_dir}/ckpt",
        checkpoint_every=1000,
        run_dir=str(run_dir),
        seed=7,
    )
    values.update(overrides)
    values.setdefault("oss_snapshot_freq", values["checkpoint_every"] // 2)
    return TEMPLATE.format(**values)
