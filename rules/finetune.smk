# One fine-tune per (experiment, source, target, penalty, alpha, beta, lr, freeze depth,
# evaluation, replicate); the output path spells the run's identity, and the run's seed is
# derived from it. The fine-tuned classifier is kept only while a later job needs it (Fig. 4).


rule finetune:
    input:
        target=lambda wildcards: task_files(wildcards.target)["meta"],
        target_images=lambda wildcards: task_files(wildcards.target)["images"],
        source=lambda wildcards: get_source_task_files(wildcards)["meta"],
        source_images=lambda wildcards: get_source_task_files(wildcards)["images"],
        model=f"{RESULTS}/sources/{{source}}/model.pt",
        info=f"{RESULTS}/sources/{{source}}/info.json",
        fisher=get_fisher_input,
        tracking=f"{RESULTS}/tracking.json",
    output:
        record=f"{RESULTS}/runs/{RUN_PATTERN}/record.json",
        model=temp(f"{RESULTS}/runs/{RUN_PATTERN}/model.pt"),
    log:
        f"logs/finetune/{RUN_PATTERN}.log",
    params:
        run_key=lambda wildcards: get_run_spec(wildcards).key,
    threads: config["finetune"]["threads"]
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/finetune.py"
