# Audit, aggregate, test, draw, benchmark: cheap rules that stay on the submitting machine
# (the benchmark excepted: it measures the machine it runs on).


localrules:
    audit,
    tables,
    plots,


rule audit:
    input:
        summaries=run_files("summary.json"),
        configs=run_files("config.json"),
        metrics=run_files("metrics.parquet"),
        meta="results/data/meta.json",
    output:
        "results/audit/fairness.json",
    log:
        "logs/audit.log",
    params:
        run_dirs=run_dirs(),
        config=config,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/audit.py"


rule tables:
    input:
        summaries=run_files("summary.json"),
        metrics=run_files("metrics.parquet"),
    output:
        summary="results/tables/summary.csv",
        tests="results/tables/tests.csv",
        curves="results/tables/curves.parquet",
    log:
        "logs/tables.log",
    params:
        run_dirs=run_dirs(),
        analysis=config["analysis"],
    conda:
        "../envs/analysis.yaml"
    script:
        "../workflow/scripts/tables.py"


rule plots:
    input:
        summary="results/tables/summary.csv",
        curves="results/tables/curves.parquet",
        summaries=run_files("summary.json"),
        bench="results/bench/scaling.csv" if config["bench"]["enabled"] else [],
    output:
        **{
            name: report(
                path,
                caption=f"../report/{name.split('_')[0]}.rst",
                category="Figures",
            )
            for name, path in figure_paths().items()
        },
    log:
        "logs/plots.log",
    params:
        run_dirs=run_dirs(),
        seq_lens=GRID["seq_lens"],
    conda:
        "../envs/analysis.yaml"
    script:
        "../workflow/scripts/plots.py"


rule bench:
    output:
        scaling="results/bench/scaling.csv",
        summary="results/bench/summary.json",
    log:
        "logs/bench.log",
    params:
        config=config,
    # every core: timings taken beside other jobs would measure the neighbours
    threads: workflow.cores
    resources:
        mem_mb=24000,
        runtime=120,
        gpu=config["resources"]["gpus"],
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/bench.py"
