"""Regenerate jobs/demo.parquet: portraits that installed packages ship (pkg:// URIs), so the demo runs offline.

python jobs/demo_manifest.py
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    {
        "id": "astronaut-beach",
        "portrait": "pkg://skimage/data/astronaut.png",
        "prompt": "A woman in an orange flight suit walks along a beach at sunset, waves behind her, cinematic light.",
        "campaign": "space-week",
    },
    {
        "id": "astronaut-office",
        "portrait": "pkg://skimage/data/astronaut.png",
        "prompt": "A woman smiles at her laptop in a bright modern office, handheld camera.",
        "campaign": "space-week",
        "seed": 7,
    },
    {
        "id": "tom-hanks-cafe",
        "portrait": "pkg://insightface/data/images/Tom_Hanks_54745.png",
        "prompt": "A man drinks coffee in a cozy cafe and looks out of the window, soft morning light.",
        "campaign": "cafe",
    },
    {
        "id": "group-photo-largest",
        "portrait": "pkg://insightface/data/images/t1.jpg",
        "prompt": "A person laughs with friends at a party, warm light.",
        "campaign": "party",
    },
    {
        "id": "coffee-no-face",
        "portrait": "pkg://skimage/data/coffee.png",
        "prompt": "A person holds a cup of coffee.",
        "campaign": "cafe",
    },
]

if __name__ == "__main__":
    out = Path(__file__).with_name("demo.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), out)
    print(f"wrote {len(ROWS)} rows to {out}")
