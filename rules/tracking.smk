# Create the MLflow store and experiment once, before fine-tunes fan out (many processes
# opening a fresh SQLite store at once fail).


localrules:
    init_tracking,


rule init_tracking:
    output:
        marker=f"{RESULTS}/tracking.json",
    log:
        "logs/init_tracking.log",
    params:
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        timeout_s=config["tracking"]["timeout_s"],
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/init_tracking.py"


# After a tracking outage: `snakemake sync_tracking` logs the runs whose records MLflow lacks
# (it has no output, so it runs whenever it is asked for; it fails while runs stay missing).
localrules:
    sync_tracking,


rule sync_tracking:
    input:
        records=all_records,
    log:
        "logs/sync_tracking.log",
    params:
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        timeout_s=config["tracking"]["timeout_s"],
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/sync_tracking.py"


# With tracking.log_from: end, the fine-tunes do not log (nor import MLflow): this one job logs
# every run MLflow lacks once the records are in (exactly once per run key, as sync_tracking).
localrules:
    log_runs,


rule log_runs:
    input:
        records=all_records,
        marker=f"{RESULTS}/tracking.json",
    output:
        logged=f"{RESULTS}/tracking_logged.json",
    log:
        "logs/log_runs.log",
    params:
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        timeout_s=config["tracking"]["timeout_s"],
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/log_runs.py"
