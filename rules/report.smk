# Tables and figures: pure functions of runs.parquet (and the analysis tables); no training
# is rerun. `snakemake --report report.html` collects them with their captions into one
# self-contained file, which opens on reports/captions/workflow.rst.


localrules:
    report,


rule report:
    input:
        unpack(lambda wildcards: {"parquet": f"{RESULTS}/runs.parquet", **analysis_tables()}),
    output:
        [
            report(
                path,
                caption=f"../reports/captions/{Path(path).stem}.rst",
                category=category(path),
                labels={"item": item_title(Path(path).stem)},
            )
            if path.endswith((".png", ".html"))
            else path
            for path in report_files()
        ],
    log:
        "logs/report.log",
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
        options=report_options(),
    conda:
        "../envs/spbench.yaml"
    script:
        "../workflow_scripts/report.py"
