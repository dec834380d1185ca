# Tables and figures: pure functions of runs.parquet (no training is rerun).


localrules:
    report,


rule report:
    input:
        parquet=f"{RESULTS}/runs.parquet",
    output:
        report_files(),
    log:
        "logs/report.log",
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/report.py"
