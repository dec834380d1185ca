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
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/init_tracking.py"
