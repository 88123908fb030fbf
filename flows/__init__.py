"""Prefect flows (the DAG and stage selection) and the `rsft` command line."""
