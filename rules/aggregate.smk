# All run records -> one typed table, results/runs.parquet (spbench.results.SCHEMA).


localrules:
    aggregate,


rule aggregate:
    input:
        records=all_records,
    output:
        parquet=f"{RESULTS}/runs.parquet",
    log:
        "logs/aggregate.log",
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/aggregate.py"
