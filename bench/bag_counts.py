"""What the rows exchange and bag mode move for the step benchmark's batches.

Usage: python bench/bag_counts.py

For bench/embedding.py's step workload (8 tables x 1e6, batch 4096 over 8 devices, bags
of 1-20 ids, rows dealt r % 8 to the owners), per device and owner, on the 3 batches:
distinct rows asked (rows exchange), entries and distinct (example, table) bags with an
id there (bag mode, lf_jax.embedding.bag_exchange). Prints means, maxima and the bytes a
device sends and receives per step when the capacities are the maxima: rows mode C x (4
+ 2 x 4 D), bag mode Ce x 12 + Cb x 2 x 4 D per owner.

Example:
    python bench/bag_counts.py   # uniform ... 0.53x; zipf ... 2.10x
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import embedding as bench  # noqa: E402

OWNERS, DIM = 8, 64


def counts(dist: str) -> tuple[list, list, list]:
    """Per (batch, device, owner): distinct rows, entries, distinct bags."""
    rows_c, ents_c, bags_c = [], [], []
    for batch in bench.host_batches(bench.step_config(dist, OWNERS)):
        ids = np.stack([batch[k] for k in sorted(batch)], axis=1)  # [B, T, L]
        per = ids.shape[0] // OWNERS
        for d in range(OWNERS):
            x = ids[d * per : (d + 1) * per]
            n, t, _ = np.nonzero(x >= 0)
            r = x[x >= 0]
            for s in range(OWNERS):
                at = r % OWNERS == s
                rows_c.append(len(np.unique(t[at] * 10**7 + r[at])))
                ents_c.append(int(at.sum()))
                bags_c.append(len(np.unique(n[at] * ids.shape[1] + t[at])))
    return rows_c, ents_c, bags_c


def main() -> None:
    for dist in ("uniform", "zipf"):
        rows_c, ents_c, bags_c = counts(dist)
        c, ce, cb = max(rows_c), max(ents_c), max(bags_c)
        rows_mb = OWNERS * c * (4 + 2 * 4 * DIM) / 1e6
        bag_mb = OWNERS * (ce * 12 + cb * 2 * 4 * DIM) / 1e6
        print(
            f"{dist}: mean per (device, owner) rows {np.mean(rows_c):.0f}, entries "
            f"{np.mean(ents_c):.0f}, bags {np.mean(bags_c):.0f}; max C {c}, Ce {ce}, Cb {cb}; "
            f"per device and step: rows {rows_mb:.1f} MB, bags {bag_mb:.1f} MB "
            f"({bag_mb / rows_mb:.2f}x)"
        )


if __name__ == "__main__":
    main()
