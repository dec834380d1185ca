# Model selection: each method's setting (its hyper-parameters and lr) is chosen per (source, target) on folds of
# the training set (never the test set). A checkpoint: the test-set runs that follow spell
# the chosen setting in their paths.


localrules:
    select_setting,
    halve,


checkpoint select_setting:
    input:
        unpack(get_selection_inputs),
    output:
        selection=f"{RESULTS}/selection/{{source}}/{{target}}/{{method}}.json",
    log:
        "logs/selection/{source}/{target}/{method}.log",
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/select_setting.py"


# Opt-in successive halving (selection.halving): rung r trains the candidates that rung r - 1
# kept for fewer steps; this checkpoint scores a rung and keeps the best 1/eta for the next.
checkpoint halve:
    input:
        records=get_rung_records,
    output:
        survivors=f"{RESULTS}/selection/{{source}}/{{target}}/{{method}}/rung{{rung}}.json",
    log:
        "logs/selection/{source}/{target}/{method}/rung{rung}.log",
    wildcard_constraints:
        rung=r"\d+",
    params:
        eta=lambda wildcards: config["selection"]["halving"]["eta"],
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/halve.py"
