"""Rules download / manual_download: fetch a file (or check the user's manual file), verified."""
import os
from pathlib import Path

from spbench.download import fetch, verify_file
from spbench.progress import setup_logging

setup_logging(snakemake.log[0])
spec, out = snakemake.params.spec, Path(snakemake.output[0])
if "url" in spec:
    fetch(spec["url"], out, checksum=spec["checksum"])
else:
    manual = Path(spec["manual"]).resolve()
    if not manual.is_file():
        raise FileNotFoundError(
            f"manual download {snakemake.wildcards.download!r}: no file {manual}; download it yourself "
            f"(e.g. from image-net.org after registering) and set downloads.{snakemake.wildcards.download}.manual"
        )
    verify_file(manual, spec["checksum"], record_to=out.with_name(out.name + ".sha256"))
    os.symlink(manual, out)  # the big file stays where the user keeps it
