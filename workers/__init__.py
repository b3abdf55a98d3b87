"""hymba_batch.workers: the thin Ray layer that joins the data plane (``pipeline``) to the model
(``model``): ``actor`` owns one Engine and runs units, ``pool`` dispatches units to actors with
bounded in-flight work, restarts dead actors and retries their units. The only package that
imports both torch and ray."""
