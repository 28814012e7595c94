# Paper/appendix.tex from measured results only; the PDF wherever a LaTeX engine is installed.


localrules:
    appendix,
    appendix_pdf,


rule appendix:
    input:
        unpack(lambda w: figure_paths()),
        summary="results/tables/summary.csv",
        tests="results/tables/tests.csv",
        audit="results/audit/fairness.json",
        meta="results/data/meta.json",
        systems=run_files("system.json"),
        configs=run_files("config.json"),
        template=workflow.source_path("../paper/templates/appendix.tex.j2"),
        bench=["results/bench/scaling.csv", "results/bench/summary.json"]
        if config["bench"]["enabled"]
        else [],
    output:
        "paper/appendix.tex",
    log:
        "logs/appendix.log",
    params:
        run_dirs=run_dirs(),
        figures=figure_captions(),
        allow_failed_checks=config["analysis"]["allow_failed_checks"],
        alpha=config["analysis"]["alpha"],
        command=reproduce_command(),
    conda:
        "../envs/analysis.yaml"
    script:
        "../workflow/scripts/appendix.py"


rule appendix_pdf:
    input:
        unpack(lambda w: figure_paths()),
        tex="paper/appendix.tex",
        wrapper=workflow.source_path("../paper/appendix_standalone.tex"),
    output:
        "paper/appendix.pdf",
    log:
        "logs/appendix_pdf.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../workflow/scripts/appendix_pdf.py"
