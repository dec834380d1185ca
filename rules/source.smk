# Source networks: checkpoint (backbone + its own source head) and info.json (source accuracy).
# One rule per way of obtaining the weights; each source takes the rule named by its
# `weights` key (the wildcard constraints keep the rules apart).


rule pretrain_source:
    input:
        unpack(get_source_task_files),
    output:
        model=f"{RESULTS}/sources/{{source}}/model.pt",
        info=f"{RESULTS}/sources/{{source}}/info.json",
    wildcard_constraints:
        source=sources_with_weights("pretrain"),
    log:
        "logs/source/{source}.log",
    params:
        spec=lambda wildcards: canonical(config["sources"][wildcards.source]),
    threads: config["finetune"]["threads"]
    resources:
        **get_cluster_resources(),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/build_source.py"


rule source_from_file:
    input:
        unpack(get_source_task_files),
        weights=lambda wildcards: config["sources"][wildcards.source]["path"],
    output:
        model=f"{RESULTS}/sources/{{source}}/model.pt",
        info=f"{RESULTS}/sources/{{source}}/info.json",
    wildcard_constraints:
        source=sources_with_weights("file"),
    log:
        "logs/source/{source}.log",
    params:
        spec=lambda wildcards: canonical(config["sources"][wildcards.source]),
    resources:
        **get_cluster_resources(),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/build_source.py"


rule source_from_download:
    input:
        unpack(get_source_task_files),
        weights=lambda wildcards: get_raw_file(config["sources"][wildcards.source]["download"]),
    output:
        model=f"{RESULTS}/sources/{{source}}/model.pt",
        info=f"{RESULTS}/sources/{{source}}/info.json",
    wildcard_constraints:
        source=sources_with_weights("download"),
    log:
        "logs/source/{source}.log",
    params:
        spec=lambda wildcards: canonical(config["sources"][wildcards.source]),
    threads: config["finetune"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/build_source.py"
