"""Batch engines: Parquet/Arrow jobs that combine the vector formats (`vectors`) with the encoder (`text`).

`embed_tables` embeds a text column of Parquet files record batch by record batch (`EmbedBatch`);
`ray_engine` runs `FilterBatch` / `EmbedBatch` on Ray Data; `spark` applies a filter to a Spark
DataFrame through Arrow. Ray and pyspark are optional: their modules import them inside functions
and say which pip command installs them.
"""
