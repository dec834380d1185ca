# spbench: regularised fine-tuning, from data to the paper's tables.
# The pipeline, in order: prepare tasks -> source networks -> Fisher information ->
# tracking store -> fine-tunes (model selection on training folds, then the test-set runs
# of the grid and the figures) -> runs.parquet -> analyses -> tables and figures.
# Every key of the config is validated (rules/common.smk) before any job starts.
from snakemake.utils import min_version

min_version("9.0")


# `snakemake --report report.html` opens on this page; its items are the report rule's outputs.
report: "reports/captions/workflow.rst"


# The config you pass is the config that runs: `--configfile X` (one file or several, merged in
# order) replaces the demo's config.yaml instead of being merged over it; with no
# --configfile, config.yaml (the embedded demo) runs. `--config key=value` applies to either.
if not workflow.overwrite_configfiles:
    workflow.configfile("config.yaml")


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/data.smk"
include: "rules/source.smk"
include: "rules/fisher.smk"
include: "rules/tracking.smk"
include: "rules/finetune.smk"
include: "rules/selection.smk"
include: "rules/aggregate.smk"
include: "rules/analysis.smk"
include: "rules/report.smk"


rule all:
    input:
        final_outputs(),
        # every run's record is a target too: Snakemake does not remake a deleted file that
        # only feeds an up-to-date output (runs.parquet); a requested one it does
        all_records,
    default_target: True


# A local run forks its heavy jobs from one server that has imported torch and spbench
# (spbench.forkserver; `forkserver: false` in the config turns it off): each job then starts
# in a fraction of a second instead of several. A cluster run's jobs start on their own nodes.
onstart:
    start_forkserver()


onsuccess:
    stop_forkserver()
    print_summary()


onerror:
    stop_forkserver()
