# Prepare each task once into the on-disk format (uint8 image cache, split file, metadata).
# A local rule: it reads (or downloads) the data, which compute nodes may not reach.


localrules:
    prepare_task,


rule prepare_task:
    output:
        **task_files("{task}"),
    log:
        "logs/prepare_task/{task}.log",
    params:
        spec=lambda wildcards: canonical(config["tasks"][wildcards.task]),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/prepare_task.py"
