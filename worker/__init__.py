"""The PACS service: settings, jobs, leases, Celery app and tasks, the listener service, metrics, preflight.

It receives slides, queues and runs jobs (:func:`her2_analysis.pipeline.score_slide`) and delivers their
results; it holds no image analysis of its own (docs/architecture.md).
"""
