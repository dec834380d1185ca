# One fine-tune per (experiment, source, target, method, setting, freeze depth, evaluation,
# replicate); the output path spells the run's identity, and the run's seed is
# derived from it. The fine-tuned classifier is kept only while a later job needs it (Fig. 4).
# A preempted run (SIGTERM) leaves a checkpoint and fails; its retry resumes from it.


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
        # The run's resolved config (spbench.pipeline.run_config), as Snakemake's params rerun
        # trigger sees it: a config change reruns the runs it changes, and only those.
        run_config=get_run_config,
        # Not an output: Snakemake deletes the outputs of a failed attempt, and the
        # checkpoint must outlive it (a preempted run resumes from it).
        checkpoint=lambda wildcards: checkpoint_path(get_run_spec(wildcards)),
    threads: config["finetune"]["threads"]
    resources:
        **get_cluster_resources(),
    # On a cluster, `--group-components finetunes=N` packs N fine-tunes into one allocation.
    group:
        "finetunes"
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/finetune.py"
