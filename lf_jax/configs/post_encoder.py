"""Multi-task post encoder: the pretrained MiniLM, siamese, projected to 50 dims.

Command:  lf-jax train --config configs/post_encoder.py --workdir runs/post_encoder
Devices:  8 simulated CPU devices, mesh data=8: each data group draws its batch from one
          task per step (data.task_proportions).
Time:     see README "Post encoder" (measured: a few minutes on 2 cores).
Metric:   per task of post_texts/tiny's test split, the fraction of triplets whose positive
          is closer (``<task>/triplet_acc``), including the zero-shot ``intent`` task, next
          to the untuned MiniLM (``<task>/minilm_triplet_acc``).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model_family = "post_encoder"
    config.devices = 8
    config.mesh = ml_collections.ConfigDict({"data": -1})
    config.seed = 0
    config.batch_size = 32  # pairs per step: 8 groups x 4 pairs
    config.model = ml_collections.ConfigDict(
        {
            # starting weights; "" = random BERT of the sizes below
            "pretrained": "all-MiniLM-L6-v2",
            "tokenizer": "all-MiniLM-L6-v2",  # used when pretrained is ""
            "hidden_size": 384,
            "num_layers": 6,
            "num_heads": 12,
            "intermediate_size": 1536,
            "projection_dim": 50,
            "sharding": "replicated",  # replicated | fsdp | tensor | fsdp_tensor
        }
    )
    config.loss = ml_collections.ConfigDict({"init_scale": 10.0, "init_bias": -5.0})
    config.train = ml_collections.ConfigDict(
        {
            "steps": 120,
            "learning_rate": 1e-4,
            "weight_decay": 1e-4,
            "warmup_steps": 10,
            "grad_accum_steps": 1,
            "eval_every": 120,
            "checkpoint_every": 120,
            "keep_checkpoints": 1,
            "log_every": 10,
            "warm_start": "",
        }
    )
    config.eval = ml_collections.ConfigDict(
        {"baseline": True, "baseline_model": "all-MiniLM-L6-v2"}
    )
    config.data = ml_collections.ConfigDict(
        {
            "dataset": "post_texts",
            "config": "tiny",
            "data_dir": "",
            "max_length": 32,
            # interests, storylines, hashtags, queries
            "task_proportions": (0.25, 0.25, 0.25, 0.25),
            "seed": 1,
        }
    )
    return config
