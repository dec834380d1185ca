# Model selection: each method's setting (its hyper-parameters and lr) is chosen per (source, target) on folds of
# the training set (never the test set). A checkpoint: the test-set runs that follow spell
# the chosen setting in their paths.


checkpoint select_setting:
    input:
        records=get_selection_records,
    output:
        selection=f"{RESULTS}/selection/{{source}}/{{target}}/{{method}}.json",
    log:
        "logs/selection/{source}/{target}/{method}.log",
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/select_setting.py"
