# Diagonal Fisher information of each source network on its source data (SPEC §3).


rule estimate_fisher:
    input:
        unpack(get_source_task_files),
        model=f"{RESULTS}/sources/{{source}}/model.pt",
    output:
        fisher=f"{RESULTS}/sources/{{source}}/fisher.pt",
    log:
        "logs/fisher/{source}.log",
    params:
        fisher=canonical(config["fisher"]),
    threads: config["finetune"]["threads"]
    resources:
        **get_cluster_resources(),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/estimate_fisher.py"
