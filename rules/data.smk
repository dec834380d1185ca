# Prepare each task once into the on-disk format (uint8 image cache, split file, metadata).


rule prepare_task:
    output:
        **task_files("{task}"),
    log:
        "logs/prepare_task/{task}.log",
    params:
        spec=lambda wildcards: config["tasks"][wildcards.task],
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/prepare_task.py"
