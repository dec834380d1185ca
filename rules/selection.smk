# Model selection: each penalty's (alpha, beta, lr) is chosen per (source, target) on folds of
# the training set (never the test set). A checkpoint: the test-set runs that follow spell
# the chosen setting in their paths.


checkpoint select_setting:
    input:
        records=get_selection_records,
    output:
        selection=f"{RESULTS}/selection/{{source}}/{{target}}/{{penalty}}.json",
    log:
        "logs/selection/{source}/{target}/{penalty}.log",
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/select_setting.py"
