# One job per (model, seq_len, seed). Checkpoints live outside the declared outputs, so that
# Snakemake's clean-up of an incomplete job leaves them for the resumed run.


rule train:
    input:
        rules.prepare_data.output,
    output:
        metrics=f"{RUN}/metrics.parquet",
        summary=f"{RUN}/summary.json",
        config=f"{RUN}/config.json",
        system=f"{RUN}/system.json",
    log:
        "logs/train/{model}/L{seq_len}/seed{seed}.log",
    params:
        run_config=lambda w: run_config(config, w.model, int(w.seq_len), int(w.seed)),
        checkpoint_dir="results/checkpoints/{model}/L{seq_len}/seed{seed}",
    threads: 1
    resources:
        mem_mb=train_mem_mb,
        runtime=train_runtime,
        gpu=config["resources"]["gpus"],
        cpus_per_gpu=config["resources"]["cpus_per_gpu"] if config["resources"]["gpus"] else 0,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/train.py"
