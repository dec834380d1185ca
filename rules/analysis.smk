# Analyses beyond accuracy: Fig. 4 (how far each unit's activation moved) and the penalty's
# compute overhead (paper section 4.4.1).


rule activations:
    input:
        unpack(get_finetuned_models),
        source_model=f"{RESULTS}/sources/{{source}}/model.pt",
        target=lambda wildcards: task_files(config["figures"]["activations"]["target"])["meta"],
    output:
        r2=f"{RESULTS}/activations/{{source}}.parquet",
    log:
        "logs/activations/{source}.log",
    params:
        max_images=config.get("figures", {}).get("activations", {}).get("max_images", 0),
    threads: config["finetune"]["threads"]
    resources:
        **get_cluster_resources(),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/activations.py"


localrules:
    collect_activations,
    collect_overhead,


rule collect_activations:
    input:
        tables=expand(f"{RESULTS}/activations/{{source}}.parquet", source=config["grid"]["sources"]),
    output:
        r2=f"{RESULTS}/activations.parquet",
    log:
        "logs/activations/collect.log",
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/concat_tables.py"


rule overhead:
    input:
        task=lambda wildcards: get_source_task_files(wildcards)["meta"],
    output:
        overhead=f"{RESULTS}/overhead/{{source}}.parquet",
    log:
        "logs/overhead/{source}.log",
    params:
        arch=lambda wildcards: config["sources"][wildcards.source]["arch"],
        penalties=[m for m in config["grid"]["methods"] if m in PENALTIES],
        options=canonical(config.get("figures", {}).get("overhead", {})),
    threads: config["finetune"]["threads"]
    resources:
        **get_cluster_resources(),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/overhead.py"


use rule collect_activations as collect_overhead with:
    input:
        tables=expand(f"{RESULTS}/overhead/{{source}}.parquet", source=config["grid"]["sources"]),
    output:
        overhead=f"{RESULTS}/overhead.parquet",
    log:
        "logs/overhead/collect.log",
