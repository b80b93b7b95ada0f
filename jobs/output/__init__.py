"""The output directory: its files, their schema, who writes them, and what they say.

Everything a run leaves under OUT is written here (store, schema, media, lock, submissions) and
read back here (summary, status, progress). Nothing in this package starts a rank or a job.
"""
