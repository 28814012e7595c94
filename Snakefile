# fairlm: a fair, honest, reproducible comparison of ResNet-BK and Mamba at long context.
# Rules live in rules/*.smk; this file sets the config and the final targets only.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/analysis.smk"
include: "rules/paper.smk"


rule all:
    input:
        final_targets(),
    default_target: True
