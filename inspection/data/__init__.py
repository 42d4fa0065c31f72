"""Data sets: ELPV images, bearing recordings, SKAB, composite units and Parquet history."""
