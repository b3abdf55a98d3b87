"""Airflow DAG: the hymba-batch incremental job every hour on an existing Ray cluster.

Each run submits ``hymba-batch run /config/job.yaml --incremental`` through Ray's job API, waits
for it, and fails the task when the Ray job fails. The spec is the one mounted at /config on the
head of infra/k8s/raycluster.yaml; only input files no earlier run processed are processed.

Needs, in the Airflow environment (Airflow >= 2.7, Python <= 3.12):
- the Ray provider: ``pip install astro-provider-ray`` (its operators are imported from
  ``ray_provider.operators``; note that Astronomer no longer maintains it);
- a connection of type ``ray`` named ``ray_hymba`` with the job server's address, e.g. as an
  environment variable of the scheduler and workers:
  ``AIRFLOW_CONN_RAY_HYMBA='{"conn_type": "ray", "extra": {"address": "http://hymba-batch-head-svc:8265"}}'``
- for a cluster with Ray token authentication (raycluster.yaml): ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN`` from the cluster's Secret (``hymba-batch``, key ``auth_token``) in the
  workers' and triggerer's environment; Ray's job client sends the token.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow import DAG
from ray_provider.operators import SubmitRayJob

with DAG(
    dag_id="hymba_batch_hourly",
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["hymba-batch"],
) as dag:
    SubmitRayJob(
        task_id="incremental_run",
        conn_id="ray_hymba",
        entrypoint="hymba-batch run /config/job.yaml --incremental",
        runtime_env={},
        num_cpus=0,
        num_gpus=0,
        fetch_logs=True,
        wait_for_completion=True,
        job_timeout_seconds=3 * 3600,
        poll_interval=60,
    )
