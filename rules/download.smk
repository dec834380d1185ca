# Raw inputs: every download fetched once (resumable, bounded retries, verified, atomic), or a
# manual file (ImageNet) checked; archives extracted safely; real tasks prepared from them.
# Downloads and extraction are local rules: they run on the submit host, where clusters have
# internet. Logic: spbench.download and spbench.datasets.


localrules:
    download,
    manual_download,
    extract,


rule download:
    output:
        f"{DATA}/raw/{{download}}/{{filename}}",
    wildcard_constraints:
        download=downloads_of_kind("url"),
        filename=r"[^/]+",
    log:
        "logs/download/{download}/{filename}.log",
    params:
        spec=lambda wildcards: canonical(config["downloads"][wildcards.download]),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/download.py"


# No input: a missing manual file is reported by the job, with what to download, so that
# `snakemake -n` still shows the whole DAG.
rule manual_download:
    output:
        f"{DATA}/raw/{{download}}/{{filename}}",
    wildcard_constraints:
        download=downloads_of_kind("manual"),
        filename=r"[^/]+",
    log:
        "logs/download/{download}/{filename}.log",
    params:
        spec=lambda wildcards: canonical(config["downloads"][wildcards.download]),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/download.py"


rule extract:
    input:
        lambda wildcards: get_raw_file(wildcards.download),
    output:
        directory(f"{DATA}/extracted/{{download}}"),
    wildcard_constraints:
        download=archive_downloads(),
    log:
        "logs/extract/{download}.log",
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/extract.py"


# Real tasks read their raw inputs; the demo's tasks (rules/data.smk) read none.
ruleorder: prepare_real_task > prepare_task


rule prepare_real_task:
    input:
        get_task_raw_inputs,
    output:
        **task_files("{task}"),
    wildcard_constraints:
        task=tasks_with_raw_inputs(),
    log:
        "logs/prepare_task/{task}.log",
    threads: 4
    resources:
        mem_mb=4000,
        runtime=240,
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/prepare_task.py"
