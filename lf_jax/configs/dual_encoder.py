"""Member/item dual encoder: a tiny random-init Llama on the member_items prompts.

Command:  lf-jax train --config configs/dual_encoder.py --workdir runs/dual_encoder
Devices:  8 simulated CPU devices, mesh data=8 (negatives gathered across all 8).
Time:     see README "Dual encoder" (measured: a few minutes on 2 cores).
Metric:   recall@10 of held-out member->item pairs over the 3,000-item corpus, per
          Matryoshka dim (16/32/64), next to the popularity baseline (eval metrics
          ``recall@10/dim16`` ... ``recall@10/popularity``).

Members and items are the feed_logs tiny world's (member m = "m<m>", post p = "p<p>").
GradCache: ``--config.train.grad_accum_steps=4`` embeds the batch in 4 chunks with the
same gradient as one pass; ``--config.train.grad_cache=false`` switches to plain
accumulation (negatives only within a micro-batch).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model_family = "dual_encoder"
    config.devices = 8
    config.mesh = ml_collections.ConfigDict({"data": -1})
    config.seed = 0
    config.batch_size = 256  # pairs per step: 256 members x 256 items of negatives
    config.model = ml_collections.ConfigDict(
        {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 128,
            "pooling": "last",  # last (the [EOS] ending every prompt) | mean
            "sharding": "replicated",  # replicated | fsdp | tensor | fsdp_tensor
        }
    )
    config.loss = ml_collections.ConfigDict(
        {
            "temperature": 0.05,
            "matryoshka_dims": (16, 32, 64),  # nested prefixes; the last is the full hidden size
            "matryoshka_weights": (),  # () : 1 each
            "symmetric": True,  # member->item and item->member
        }
    )
    config.prompts = ml_collections.ConfigDict(
        {
            "member": (
                "member interests {interests} tags {hashtags} followers {followers} "
                "activity {activity} tenure {account_age_days}"
            ),
            "item": (
                "post {text} tags {hashtags} author followers {author_followers} "
                "likes {prior_likes} age {age_hours}"
            ),
            "num_buckets": 5,  # percentile buckets: lowest low medium high highest
        }
    )
    config.train = ml_collections.ConfigDict(
        {
            "steps": 300,
            "learning_rate": 3e-3,
            "weight_decay": 1e-4,
            "warmup_steps": 20,
            "grad_accum_steps": 1,  # GradCache chunks per step
            "grad_cache": True,
            "eval_every": 150,
            "checkpoint_every": 150,
            "keep_checkpoints": 2,
            "log_every": 25,
            "warm_start": "",
        }
    )
    config.eval = ml_collections.ConfigDict({"recall_k": 10})
    config.data = ml_collections.ConfigDict(
        {
            "dataset": "member_items",
            "config": "tiny",
            "data_dir": "",
            "max_length": 40,
            "seed": 1,
        }
    )
    return config
