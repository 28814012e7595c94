# WikiText-2 → one tokenizer for every model → memory-mapped token arrays + meta.json.


localrules:
    prepare_data,


rule prepare_data:
    output:
        meta="results/data/meta.json",
        tokenizer="results/data/tokenizer.json",
        arrays=expand("results/data/{split}.npy", split=["train", "valid", "test"]),
    log:
        "logs/prepare_data.log",
    params:
        data=config["data"],
        data_dir=config["data_dir"],
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/prepare_data.py"
