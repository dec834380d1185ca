# The fine-tunes, by run group (spbench.config.run_groups): one job per (experiment, source,
# target, method, setting, freeze depth) trains the group's runs (its evaluations × replicates)
# one after the other in one process, so that starting Python and importing torch is paid once
# per group, not per run (in a local run, not at all: the job forks from spbench.forkserver).
# Each run keeps its own output path, which spells its identity (the run's seed is derived
# from it), its record, log and checkpoint. The fine-tuned classifier is
# kept only while a later job needs it (Fig. 4). A preempted run (SIGTERM) leaves a checkpoint
# and fails the job; the retry restores the group's finished runs and resumes the preempted one.

GROUP_PATTERN = RunSpec.GROUP_PATTERN.removeprefix("{experiment}/")


def group_specs(experiment, wildcards):
    """The group's runs; WorkflowError for a setting that is not canonical (parse_setting) or
    not the method's (resolve_hparams), which every run of the group shares."""
    try:
        members = group_members(config, experiment, wildcards.source, wildcards.target, wildcards.method,
                                parse_setting(wildcards.setting), int(wildcards.freeze))
        method_class(wildcards.method).resolve_hparams(members[0].hparams)
    except ValueError as err:
        raise WorkflowError(f"bad run path: {err}") from None
    return members


def group_run_config(experiment, wildcards):
    """Each run's resolved config, canonical JSON (a param: a config change reruns the groups
    whose runs it changes, and only those)."""
    from spbench.pipeline import run_config

    return json.dumps({s.key: run_config(config, s) for s in group_specs(experiment, wildcards)}, sort_keys=True)


for _experiment, (_evaluations, _replicates) in run_groups(config).items():
    _runs = [f"{_experiment}/{GROUP_PATTERN}/{e}/rep{r}" for e in _evaluations for r in range(_replicates)]

    rule:
        name:
            f"finetune_{_experiment}"
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
            records=[f"{RESULTS}/runs/{run}/record.json" for run in _runs],
            models=temp([f"{RESULTS}/runs/{run}/model.pt" for run in _runs]),
        log:
            [f"logs/finetune/{run}.log" for run in _runs],
        params:
            run_keys=lambda wildcards, experiment=_experiment: [s.key for s in group_specs(experiment, wildcards)],
            run_config=lambda wildcards, experiment=_experiment: group_run_config(experiment, wildcards),
            # Not outputs: Snakemake deletes the outputs of a failed attempt, and the
            # checkpoints (and the finished runs kept beside them) must outlive it.
            checkpoints=lambda wildcards, experiment=_experiment: [
                checkpoint_path(s) for s in group_specs(experiment, wildcards)
            ],
        threads: config["finetune"]["threads"]
        resources:
            **get_cluster_resources(len(_runs)),
        # On a cluster, `--group-components finetunes=N` packs N groups into one allocation.
        group:
            "finetunes"
        conda:
            "../envs/spbench.yaml"
        script:
            "../workflow_scripts/finetune.py"
